"""``python -m memloc``: the same as the ``memloc`` command (see memloc.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
