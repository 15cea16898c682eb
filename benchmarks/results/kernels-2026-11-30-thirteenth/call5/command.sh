export PYTHONPATH=$PWD:$PWD/benchmarks
K="python3 benchmarks/bench_kernels.py --keeps 0.1 --out /tmp/k"
F='^\| [0-9]'
python3 tools/check_cuda.py > $OUT/check_cuda.log 2>&1; echo "check_cuda (PDL on) rc=$?"; tail -2 $OUT/check_cuda.log
echo "=== main 7f6adab"; (cd ab/main && PYTHONPATH=$PWD:$PWD/benchmarks $K --contexts 131072 --modes prefill 2>&1 | tee $OUT/main.log | grep -E "$F")
for pdl in 0 1; do
  echo "=== PDL=$pdl"; HF_SQUEEZE_PDL=$pdl $K --contexts 131072 --modes decode,pinned-decode,prefill 2>&1 | tee $OUT/pdl$pdl.log | grep -E "$F"
  HF_SQUEEZE_PDL=$pdl $K --contexts 524288 --modes hier-decode 2>&1 | tee -a $OUT/pdl$pdl.log | grep -E "$F"
done
for pdl in 0 1; do
  echo "=== again PDL=$pdl"; HF_SQUEEZE_PDL=$pdl $K --contexts 131072 --modes decode --profile 2>&1 | tee $OUT/again$pdl.log | grep -E "$F|_kernel"
done
echo "=== generate PDL=1"
timeout 230 python3 benchmarks/bench_generate.py --contexts 131072 --inputs 1024 --keeps 0.1 --new-tokens 32 --modes compiled --prefills exact lookup --out $OUT/gen 2>&1 | tee $OUT/gen.log | tail -8
