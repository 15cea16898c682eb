PYTHONPATH=$PWD python3 tools/check_cuda.py > $OUT/check_cuda.log 2>&1; echo "check_cuda rc=$?"; tail -3 $OUT/check_cuda.log
for rep in 1 2; do
tools/ab.sh run "PYTHONPATH=\$PWD:\$PWD/benchmarks python3 benchmarks/bench_kernels.py --contexts 131072,524288 --keeps 0.1 --modes prefill,hier-prefill --out /tmp/k 2>&1 | tee -a $OUT/ab.log | grep -E '^\| [0-9]|==='"
done
