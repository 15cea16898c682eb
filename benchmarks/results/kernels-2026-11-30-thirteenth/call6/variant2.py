import runpy
import sys

from hf_squeeze.kernels import attention

attention.CHAIN_PREFILL = sys.argv[1] == "1"
sys.argv = ["bench_kernels.py"] + sys.argv[2:]
runpy.run_path("benchmarks/bench_kernels.py", run_name="__main__")
