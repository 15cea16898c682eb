#!/usr/bin/env bash
# What a stream of requests costs through model.generate, and where the selection's time goes, in
# one call of the GPU machine (~400 s): the CUDA checks, benchmarks/bench_requests.py with the
# reasons of every recompilation and CUDA-graph recording (log under $OUT), and
# benchmarks/bench_select.py; the tables last.
#
#   tools/device_requests.sh
set -uo pipefail
export PYTHONPATH=$PWD:$PWD/benchmarks
python3 tools/check_cuda.py > "$OUT/check_cuda.txt" 2>&1
python3 benchmarks/bench_requests.py --context 2048 --input 64 --new-tokens 32 --requests 4 --why --out "$OUT" \
  > "$OUT/bench_requests.txt" 2> "$OUT/bench_requests.why.log"
python3 benchmarks/bench_select.py > "$OUT/bench_select.txt" 2>&1
grep -E "FAIL|all CUDA checks" "$OUT/check_cuda.txt"
grep -E "^\||^[a-z].*H200|^llama" "$OUT/bench_requests.txt"
grep -ciE "re-?record" "$OUT/bench_requests.why.log" | sed 's/^/CUDA-graph recordings logged: /'
grep -E "^\||H200" "$OUT/bench_select.txt"
