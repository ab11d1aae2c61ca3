#!/usr/bin/env bash
# Proxy c=1 overhead of two commits, alternated in one session so the machine's drift hits both alike.
#   bench/ab_commits.sh BASE [ROUNDS] [STEPS]     e.g. bench/ab_commits.sh 6cf543a 3 lat_chat,lat_emb
# BASE is checked out in a temporary worktree; HEAD's working tree is the other side. Prints each side's
# `bench/proxy_overhead.py --only STEPS` lines (each target, so a side's ratio to its own direct can be read);
# compare the "paired" figures.
set -euo pipefail
base=${1:?base revision}
rounds=${2:-3}
steps=${3:-lat_chat,lat_emb}
root=$(cd "$(dirname "$0")/.." && pwd)
py="$root/.venv/bin/python"
tree=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$tree" >/dev/null 2>&1 || true' EXIT
git -C "$root" worktree add -q --detach "$tree" "$base"
for i in $(seq "$rounds"); do
  for side in base head; do
    dir=$root; [ "$side" = base ] && dir=$tree
    echo "== $side round $i"
    (cd "$dir" && "$py" bench/proxy_overhead.py --only "$steps" --no-profile 2>&1 | grep -E ' (direct|proxy|nginx) ')
  done
done
