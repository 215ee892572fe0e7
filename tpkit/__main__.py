"""``python -m tpkit``: the ``tpkit`` command."""

import sys

from tpkit.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m tpkit"))
