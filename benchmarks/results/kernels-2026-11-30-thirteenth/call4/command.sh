export PYTHONPATH=$PWD:$PWD/benchmarks
python3 benchmarks/bench_kernels.py --contexts 131072 --keeps 0.1 --modes decode --profile --out /tmp/k 2>&1 | tee $OUT/profile_decode.log | grep -E "^\| [0-9]|_kernel|profile"
python3 benchmarks/bench_kernels.py --contexts 524288 --keeps 0.1 --modes hier-decode --profile --profile-context 524288 --out /tmp/k 2>&1 | tee $OUT/profile_hier.log | grep -E "^\| [0-9]|_kernel|profile"
# ab/sweep_scoring.py: the same sweep as benchmarks/bench_scoring_tiles.py (its first form)
timeout 420 python3 ab/sweep_scoring.py 2>&1 | tee $OUT/sweep.log | tail -18
