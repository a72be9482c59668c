#!/usr/bin/env python3
"""Merge a params profile (by default the tiny one, .ci/params-tiny.yaml) into params.yaml.

    python .ci/tiny_params.py                      # params.yaml in place, tiny profile
    python .ci/tiny_params.py params.yaml -o out.yaml --profile .ci/params-tiny.yaml

The profile is a partial params file holding only the keys it overrides; it is merged deeply
(a section's other keys stay). Every key of the profile must already exist in params.yaml: an
unknown one stops the merge, naming the key, so the profile cannot drift silently from the
params it overrides. tests/test_pipeline.py uses this module's `merge` and `load_profile`, and
the CI workflow runs this script, so both run the pipeline on the same params.

Only PyYAML is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

PROFILE = Path(__file__).resolve().with_name("params-tiny.yaml")


class ProfileError(ValueError):
    """A profile key params.yaml lacks, or a section where params.yaml has a value (or back)."""


def merge(base: dict, over: dict, prefix: str = "") -> dict:
    """Deep-merge `over` into `base` (in place, and returned). Every key of `over` must be in
    `base`; a mapping only replaces a mapping's keys one by one, never a plain value."""
    for key, value in over.items():
        name = f"{prefix}{key}"
        if key not in base:
            allowed = ", ".join(map(str, base)) or "(none)"
            where = f"under {prefix[:-1]}" if prefix else "at the top level"
            raise ProfileError(f"{name}: unknown key (not in params.yaml); allowed {where}: {allowed}")
        if isinstance(value, dict) != isinstance(base[key], dict):
            kind = "a section" if isinstance(base[key], dict) else "a value"
            raise ProfileError(f"{name}: is {kind} in params.yaml, the profile gives {type(value).__name__}")
        if isinstance(value, dict):
            merge(base[key], value, f"{name}.")
        else:
            base[key] = value
    return base


def load_profile(path: str | Path = PROFILE) -> dict:
    profile = yaml.safe_load(Path(path).read_text())
    if not isinstance(profile, dict):
        raise ProfileError("not a mapping of params sections")
    return profile


def dump(params: dict) -> str:
    """params.yaml text: keys in their order (comments are not kept)."""
    return yaml.safe_dump(params, sort_keys=False)


def apply(params: str | Path, profile: str | Path = PROFILE, out: str | Path | None = None) -> dict:
    """Read `params`, merge `profile` into it, write the result to `out` (default: `params`)."""
    merged = merge(yaml.safe_load(Path(params).read_text()), load_profile(profile))
    Path(out or params).write_text(dump(merged))
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("params", nargs="?", default="params.yaml", help="params file to read (default: params.yaml)")
    parser.add_argument("-o", "--out", help="file to write (default: the params file, in place)")
    parser.add_argument("--profile", default=str(PROFILE), help="partial params file to merge in (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        apply(args.params, args.profile, args.out)
    except ProfileError as exc:
        print(f"error: {args.profile}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out or args.params}: {args.params} with {args.profile} merged in", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
