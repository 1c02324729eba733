"""`python -m loom.bench ...`: the same as `loom bench ...`."""

import sys

from loom.bench.serve_bench import main

if __name__ == "__main__":
    sys.exit(main())
