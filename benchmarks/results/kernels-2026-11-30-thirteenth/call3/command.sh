B="--contexts 131072 --keeps 0.1 --modes prefill --out /tmp/k --profile"
for rep in 1 2; do
  echo "=== main"; (cd ab/main && PYTHONPATH=$PWD:$PWD/benchmarks python3 benchmarks/bench_kernels.py $B 2>&1 | tee -a $OUT/main.log | grep -E "^\| [0-9]|_kernel")
  for v in check never nocheck; do
    echo "=== $v"; PYTHONPATH=$PWD:$PWD/benchmarks python3 ab/variant.py $v $B 2>&1 | tee -a $OUT/$v.log | grep -E "^\| [0-9]|_kernel"
  done
done
