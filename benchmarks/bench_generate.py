"""End-to-end `generate`: TTFT and TPOT, dense vs squeezed, in one run (see `hf_squeeze.bench`).

    PYTHONPATH=. python3 benchmarks/bench_generate.py --out $OUT
is the same as `hf-squeeze bench --out $OUT`.
"""

import argparse
import sys

from hf_squeeze.bench import __doc__ as DOC
from hf_squeeze.bench import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=DOC.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
