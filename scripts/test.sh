#!/usr/bin/env bash
# Install (CPU torch from the local wheel first, so no CUDA build is pulled) and run the fast suite:
# every test not marked `slow`. `--all` also runs the slow comparisons (.ci/run passes it); other
# arguments go to pytest (a later `-m` replaces the default selection).
set -euo pipefail
cd "$(dirname "$0")/.."
select=(-m "not slow")
args=()
for a in "$@"; do
    if [ "$a" = "--all" ]; then select=(); else args+=("$a"); fi
done
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
rc=0
python3 -m pytest -q ${select[@]+"${select[@]}"} ${args[@]+"${args[@]}"} || rc=$?
if [ "$rc" -eq 5 ]; then  # pytest: no test was selected (e.g. only slow tests named, without --all)
    echo "scripts/test.sh: no test selected (slow tests need --all)" >&2
    exit 0
fi
exit "$rc"
