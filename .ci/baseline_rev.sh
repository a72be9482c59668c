#!/usr/bin/env bash
# Prints a git revision whose metrics/<method>.json are the committed baseline (.ci/baseline/metrics)
# and everything else HEAD's, so that `dvc metrics diff "$(.ci/baseline_rev.sh)" --md` compares a run
# against the baseline. Git plumbing only: neither the work tree nor the index is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
index=$(mktemp)
trap 'rm -f "$index"' EXIT
export GIT_INDEX_FILE="$index"
git read-tree HEAD
for f in .ci/baseline/metrics/*.json; do
  git update-index --add --cacheinfo "100644,$(git hash-object -w "$f"),metrics/$(basename "$f")"
done
tree=$(git write-tree)
GIT_AUTHOR_NAME=ci GIT_AUTHOR_EMAIL=ci@example.invalid GIT_COMMITTER_NAME=ci GIT_COMMITTER_EMAIL=ci@example.invalid \
  git commit-tree "$tree" -p HEAD -m "tiny params baseline (.ci/baseline)"
