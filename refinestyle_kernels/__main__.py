"""`python -m refinestyle_kernels`: the environment report and the backends' self-check (selfcheck.py)."""
import sys

from refinestyle_kernels.selfcheck import main

if __name__ == "__main__":
    sys.exit(main())
