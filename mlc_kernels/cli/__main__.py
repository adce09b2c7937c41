"""``python -m mlc_kernels.cli``: the ``mlc`` command (as ``accelerate launch``/``torchrun -m`` start it)."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
