#!/usr/bin/env bash
# Before and after in one call of the GPU machine: the GPU's host runs at different speeds from
# call to call, so a change is timed against the code it replaces in the same call.
#
#   tools/ab.sh prepare REF      # here: a copy of commit REF under ab/REF (ignored by git)
#   device: carry ["ab"], command: tools/ab.sh run 'PYTHONPATH=$PWD:$PWD/benchmarks python3 benchmarks/bench_select.py --warps 0'
#   tools/ab.sh clean            # here: remove ab/
#
# `run` runs the command in each copy under ab/ first, then in the checkout itself, each output
# headed by what ran ($PWD in the command is the copy's root).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    ref=${2:?"tools/ab.sh prepare REF: which commit (a branch, a tag, a hash)"}
    dir="ab/${ref//\//_}"
    rm -rf "$dir" && mkdir -p "$dir"
    git archive "$ref" | tar -x -C "$dir"
    echo "$dir: $(git rev-parse --short "$ref")" ;;
  run)
    command=${2:?"tools/ab.sh run 'COMMAND': what to run in each copy and in the checkout"}
    for dir in ab/*/ .; do
      [ -d "$dir" ] || continue
      echo "=== ${dir%/} ==="
      (cd "$dir" && bash -c "$command")
    done ;;
  clean)
    rm -rf ab ;;
  *)
    echo "usage: tools/ab.sh prepare REF | run 'COMMAND' | clean" >&2
    exit 2 ;;
esac
