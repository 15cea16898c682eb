export PYTHONPATH=$PWD:$PWD/benchmarks
A="--contexts 131072 --keeps 0.1 --modes prefill --out /tmp/k"
for rep in 1 2; do
  echo "=== none"; HF_SQUEEZE_PDL=0 python3 ab/variant2.py 1 $A 2>&1 | tee -a $OUT/none.log | grep -E '^\| [0-9]'
  echo "=== lookup only"; python3 ab/variant2.py 0 $A 2>&1 | tee -a $OUT/lookup.log | grep -E '^\| [0-9]'
  echo "=== all"; python3 ab/variant2.py 1 $A 2>&1 | tee -a $OUT/all.log | grep -E '^\| [0-9]'
done
