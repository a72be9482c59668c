"""The documentation: results generated, never typed; a short README; links that resolve; no lab notes.

- docs/make_results.py --check: every table in docs/results/ and the README's results block equal
  what the script writes from the committed JSON.
- README.md stays a five-minute read (at most 250 lines).
- Release-notebook wording (which release, which machine, a file outside the repository) lives in
  CHANGELOG.md only.
- Every relative Markdown link of README.md and docs/ points to a file (and heading) that exists.
- The README quotes no metric figure (0.xxx) outside its generated block.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250

# Split so that this file does not match the patterns it looks for.
NOTEBOOK_WORDS = ("this " + "release", "previous " + "machine", "DESIGN" + ".md")

# A metric figure: 0 and three or more decimals (0.982, 0.0005), not part of a longer number or name.
FIGURE = re.compile(r"(?<![\w.])[+-]?0\.\d{3,}(?![\w.])")
# Narrow exceptions, removed before the search: a param set on a command line (`-S key=0.0005`).
NOT_RESULTS = (re.compile(r"-S '?[\w.]+=[\w.,\[\]-]+'?"),)


def _markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def test_generated_results_match_the_committed_sources():
    done = subprocess.run([sys.executable, str(ROOT / "docs/make_results.py"), "--check"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, "run python docs/make_results.py:\n" + done.stdout + done.stderr


def _make_results():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import make_results
    finally:
        sys.path.remove(str(ROOT / "docs"))
    return make_results


def test_check_names_a_table_edited_by_hand(tmp_path, monkeypatch, capsys):
    make_results = _make_results()
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text())
    monkeypatch.setattr(make_results, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(make_results, "README", readme)
    assert make_results.main([]) == 0  # into tmp_path: the repository is not touched
    assert make_results.main(["--check"]) == 0
    page = tmp_path / "results" / "speed.md"
    page.write_text(page.read_text().replace("| goal |", "| target |"))
    (tmp_path / "results" / "typed.md").write_text("# typed by hand\n")
    capsys.readouterr()
    assert make_results.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "speed.md" in out and "typed.md" in out and "README.md" not in out


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"


def test_notebook_wording_only_in_the_changelog():
    pattern = "\\|".join(NOTEBOOK_WORDS)
    done = subprocess.run(["git", "grep", "-n", "--untracked", "-I", "-e", pattern, "--", ".", ":!CHANGELOG.md"],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode == 128 or "not a git repository" in done.stderr:
        pytest.skip("not a git checkout")
    assert done.returncode == 1 and not done.stdout, "only CHANGELOG.md may say these:\n" + done.stdout


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fence = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        if fence or not line.startswith("#"):
            continue
        slug = _slug(line.lstrip("#"))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path: Path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # not inside code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # nor inside code spans
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not files
            yield target


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in _links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists() or ROOT not in (dest, *dest.parents):
            broken.append(f"{target}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_readme_quotes_no_figure_outside_the_generated_block():
    make_results = _make_results()
    BEGIN, END = make_results.BEGIN, make_results.END
    text = README.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    head, rest = text.split(BEGIN, 1)
    outside = head + rest.split(END, 1)[1]
    for pattern in NOT_RESULTS:
        outside = pattern.sub("", outside)
    found = [(n, line.strip()) for n, line in enumerate(outside.splitlines(), 1) if FIGURE.search(line)]
    assert not found, "metric figures belong in the generated block (docs/make_results.py):\n" + "\n".join(
        f"{line}" for _, line in found)


def test_figure_pattern_targets_metric_figures_not_params():
    assert FIGURE.search("pixel AUROC 0.982") and FIGURE.search("(+0.005)") and FIGURE.search("lr 0.0005")
    assert not FIGURE.search("data.contamination 0.1, val_fraction 0.25, quantile 0.99")
    assert not FIGURE.search("version 10.0.123") and not FIGURE.search("x0.9-1.1")
    assert not NOT_RESULTS[0].sub("", "dvc exp run -S gan.lr=0.0005").count("0.0005")


def test_no_generated_page_reads_what_every_run_rewrites():
    """A page made from metrics/timing/ (seconds, rewritten by every `dvc repro`) would make this
    suite fail right after a user's own `./run.sh repro`; the quality metrics are byte-stable."""
    make_results = _make_results()
    for make in (make_results.realphoto_md, make_results.grid_md, make_results.speed_md,
                 make_results.embedded_md, make_results.features_md):
        sources = make()[1]
        assert not any("metrics/timing" in Path(p).as_posix() for p in sources), make.__name__
