#!/usr/bin/env bash
# anodiff's two commands. Each does its own set-up on a fresh machine:
#   ./run.sh repro [dvc repro args]   run the whole pipeline on the embedded default data
#   ./run.sh test  [pytest args]      run the tests
# The virtual environment (.venv, or $ANODIFF_VENV) is created from requirements.txt when it
# is missing, and re-synced when requirements.txt changes.
set -euo pipefail
cd "$(dirname "$0")"
export DVC_NO_ANALYTICS=1

VENV=${ANODIFF_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

setup() {
  local stamp="$VENV/.requirements.sha256" want
  want=$(sha256sum requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ ! -x "$VENV/bin/python" ]; then
    echo "setting up $VENV from requirements.txt (first run takes a few minutes)" >&2
    "$PY" -m venv "$VENV"
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 \
      | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
    "$VENV/bin/python" -c "import anodiff, torch, dvc" \
      || { echo "error: installing requirements.txt into $VENV failed" >&2; exit 1; }
    echo "$want" > "$stamp"
  fi
  case "$VENV" in /*) export PATH="$VENV/bin:$PATH" ;; *) export PATH="$PWD/$VENV/bin:$PATH" ;; esac
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  repro)
    setup
    # dvc needs a git repository with at least one commit for experiments; repro works either way
    dvc repro "$@"
    # the methods side by side (written by the report stage); `dvc metrics show` has them all
    # (speed first, then quality: what a person reads last is the comparison)
    for f in metrics/timing/summary.md metrics/summary.md; do
      if [ -f "$f" ]; then
        echo
        cat "$f"
      fi
    done
    ;;
  test)
    setup
    python -m pytest "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: ./run.sh repro|test|setup [args]" >&2
    exit 2
    ;;
esac
