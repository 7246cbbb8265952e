"""python -m steps.merge <recipe>: run the merge stage of one recipe."""
from __future__ import annotations

import logging
import sys

from steps.plan import find
from steps.store import execute

logging.basicConfig(level=logging.INFO, format="%(message)s")
execute(find(f"merge:{sys.argv[1]}"))
