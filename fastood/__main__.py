"""``python -m fastood ...``: the same as the ``fastood`` command (also under ``torchrun -m fastood``)."""
import sys

from fastood.cli import main

if __name__ == "__main__":
    sys.exit(main())
