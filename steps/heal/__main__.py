"""``python -m steps.heal ...``: the heal's command line (steps/heal/cli.py)."""
from __future__ import annotations

import sys

from steps.heal.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
