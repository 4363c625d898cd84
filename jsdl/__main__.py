"""``python -m jsdl``: the ``jsdl`` command."""
import sys

from jsdl.cli import main

if __name__ == "__main__":
    sys.exit(main())
