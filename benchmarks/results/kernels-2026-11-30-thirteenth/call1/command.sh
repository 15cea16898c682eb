set -x
B='PYTHONPATH=$PWD:$PWD/benchmarks'
python3 tools/check_cuda.py > $OUT/check_cuda.log 2>&1; echo "check_cuda rc=$?"; tail -3 $OUT/check_cuda.log
tools/ab.sh run "PYTHONPATH=\$PWD:\$PWD/benchmarks python3 benchmarks/bench_kernels.py --contexts 131072,524288 --keeps 0.1 --modes decode,hier-decode --out /tmp/k 2>&1 | tee -a $OUT/ab.log | grep -E '^\| [0-9]|==='"
PYTHONPATH=$PWD:$PWD/benchmarks python3 benchmarks/bench_select.py --clusters 6554 26214 --warps 0 2>&1 | tee $OUT/select.log | tail -15
for s in 2 4 3; do echo "stages $s"; PYTHONPATH=$PWD:$PWD/benchmarks python3 benchmarks/bench_kernels.py --contexts 131072 --keeps 0.1 --modes prefill --score-stages $s --out /tmp/k 2>&1 | tee -a $OUT/stages.log | grep -E '^\| [0-9]'; done
