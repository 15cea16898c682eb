#!/usr/bin/env bash
# What a stream of requests costs through model.generate, where a request's host time goes, and
# where the selection's time goes, in one call of the GPU machine (~400 s): the CUDA checks,
# benchmarks/bench_requests.py, benchmarks/profile_prefill.py --python at 2K and 128K and
# benchmarks/bench_select.py; the tables last. (bench_generate.py at 2K and 128K, ~200 s, fits in
# another call: its command is in BENCHMARKS.md.) `WHY=1`: bench_requests also logs recompilations and CUDA-graph recordings
# (their reasons, summarised; the log itself is large, and slows the steps it logs).
#
#   tools/device_requests.sh
set -uo pipefail
export PYTHONPATH=$PWD:$PWD/benchmarks
python3 tools/check_cuda.py > "$OUT/check_cuda.txt" 2>&1
why=()
[ "${WHY:-0}" = 1 ] && why=(--why)
python3 benchmarks/bench_requests.py --context 2048 --input 64 --new-tokens 32 --requests 4 "${why[@]}" --out "$OUT" \
  > "$OUT/bench_requests.txt" 2> "$OUT/why.log"
if [ "${WHY:-0}" = 1 ]; then
  grep -iE "record|recompil" "$OUT/why.log" | sed -E 's/0x[0-9a-f]+/X/g; s/[0-9]+/N/g' | sort | uniq -c | sort -rn \
    | head -30 > "$OUT/why_summary.txt"
fi
rm -f "$OUT/why.log"
for context in 2048 131072; do
  python3 benchmarks/profile_prefill.py --context $context --input 1024 --python --top 25 --out "$OUT" \
    > /dev/null 2> "$OUT/profile_prefill_$context.err"
done
python3 benchmarks/bench_select.py --warps 0 > "$OUT/bench_select.txt" 2>&1
grep -E "FAIL|all CUDA checks" "$OUT/check_cuda.txt"
grep -E "^\||^[a-z].*H200|^llama" "$OUT/bench_requests.txt"
for f in "$OUT"/profile_prefill_*.md; do grep -E "^host waits|^\| (dense|squeezed)" "$f"; done
grep -E "^\||H200" "$OUT/bench_select.txt"
