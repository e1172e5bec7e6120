"""End-to-end comparison on the emulated cluster (root) or localhost: see :mod:`kimad.bench.e2e`.

    .venv/bin/python benchmarks/e2e.py --nodes 2 --trace step-down --rate 100 --out runs/e2e
    .venv/bin/python benchmarks/e2e.py --workload stdlib-lm --nodes 2 --out runs/e2e-lm   # the language model
"""

import sys

from kimad.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main())
