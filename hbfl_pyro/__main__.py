"""``python -m hbfl_pyro``: the ``hbfl`` command line (see :mod:`hbfl_pyro.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
