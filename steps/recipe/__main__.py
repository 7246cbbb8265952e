"""python -m steps.recipe <recipe.yaml>...: validate and print the normalized recipe."""
from __future__ import annotations

import json
import sys

from steps.recipe import load

for arg in sys.argv[1:]:
    r = load(arg)
    print(json.dumps({"name": r.name, "sources": {k: v.spec for k, v in r.sources.items()}, "merge": r.merge,
                      "gguf": r.gguf, "imatrix": r.imatrix, "quantize": r.quantize, "bench": r.bench}, indent=1))
