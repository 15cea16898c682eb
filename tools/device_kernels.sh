#!/usr/bin/env bash
# The decode kernels side by side on the GPU machine, in one call (BENCHMARKS.md): the default
# (pieces of 8 kept keys; decode tiles of 8 pieces x 4 warps = 64 rows, with pins 16 x 8 = 128
# rows), pieces of 16 and 32 keys (the earlier default) with 128-row tiles, a decode tile of 32 rows,
# and the default again (the run-to-run spread), each at 128K and 512K, keep 0.1, then a short
# table of the graph-replayed times. (Clusters hold ~20 keys: pieces of 32 rows leave ~41% of a
# tile's rows empty, of 16 ~27%, of 8 ~15%, on SmolLM2's index.) Then the per-kernel profiles of
# the runs with --profile. Logs and CSVs under $OUT/<variant>/.
#
#   tools/device_kernels.sh [CONTEXTS]      (default 131072,524288)
# (On a CPU, to try the script: BENCH_ARGS=--smoke TRITON_INTERPRET=1 HF_SQUEEZE_KERNELS=1 OUT=/tmp/x
#  tools/device_kernels.sh 2048.)
set -uo pipefail
contexts=${1:-131072,524288}
export PYTHONPATH=$PWD:$PWD/benchmarks
run() {  # NAME ARGS...: one bench_kernels run, skipped once BUDGET_S seconds have passed
  local name=$1
  shift
  if ((SECONDS > ${BUDGET_S:-480})); then
    echo "$name skipped: the script has run ${SECONDS} s (BUDGET_S=${BUDGET_S:-480})"
    return
  fi
  mkdir -p "$OUT/$name"
  # shellcheck disable=SC2086
  python3 benchmarks/bench_kernels.py --contexts "$contexts" --keeps 0.1 --out "$OUT/$name" ${BENCH_ARGS:-} "$@" \
    > "$OUT/$name/log.txt" 2>&1 || echo "$name failed: see $OUT/$name/log.txt"
}
run default --modes decode,pinned-decode,hier-decode,prefill --profile
run pieces-16 --modes decode,pinned-decode,hier-decode,prefill --piece-rows 16 --decode-pieces 8
run pieces-32 --modes decode,pinned-decode,hier-decode,prefill --piece-rows 32 --decode-pieces 4
run tile-32-rows --modes decode,pinned-decode,hier-decode --decode-pieces 4
run default-again --modes decode,pinned-decode,hier-decode
python3 - "$OUT" <<'EOF'
import csv, sys
from pathlib import Path

rows = {}
for path in Path(sys.argv[1]).glob("*/kernels.csv"):  # one folder per variant run above
    for r in csv.DictReader(open(path)):
        rows[(int(r["context"]), r["mode"], path.parent.name)] = r
print("| context | mode | variant | ours us (graph) | lookup us | dense us | speedup |")
print("|---|---|---|---|---|---|---|")
for (context, mode, variant), r in sorted(rows.items()):
    dense = min((float(r[k]) for k in ("dense_cudnn_us", "dense_flash_us") if float(r[k]) == float(r[k])), default=float("nan"))
    print(f"| {context // 1024}K | {mode} | {variant} | {float(r['ours_graph_us']):.1f} | {float(r['lookup_us']):.1f} "
          f"| {dense:.1f} | {float(r['speedup']):.2f}x |")
EOF
for log in "$OUT"/*/log.txt; do  # the per-kernel profiles of the runs with --profile
  if grep -q "us  x" "$log"; then
    echo
    echo "$(basename "$(dirname "$log")"):"
    grep -E "us  x|context=" "$log" | sed -E 's/, fine_scored_fraction.*//'
  fi
done
