"""``python -m vlsi`` is the ``vlsi`` command (so ``accelerate launch -m vlsi ...`` works too)."""

import sys

from vlsi.run.cli import main

if __name__ == "__main__":
    sys.exit(main())
