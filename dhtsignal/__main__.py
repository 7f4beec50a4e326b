"""``python -m dhtsignal``: the command line (see :mod:`dhtsignal.cli`)."""

from __future__ import annotations

import sys

from dhtsignal.cli import main

if __name__ == "__main__":
    sys.exit(main())
