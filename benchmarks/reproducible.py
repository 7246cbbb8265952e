"""Two clean builds of a recipe (each with its own build/ and store) and the artifacts whose digests differ.

    .venv/bin/python benchmarks/reproducible.py [recipes/demo.yaml]      # about 4 minutes for the demo
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(ws: Path, recipe: Path) -> dict[str, object]:
    (ws / "recipes").mkdir(parents=True)
    (ws / "recipes" / recipe.name).symlink_to(recipe.resolve())
    for sub in ("data",):
        if (recipe.parent / sub).is_dir():
            (ws / "recipes" / sub).symlink_to((recipe.parent / sub).resolve())
    env = dict(os.environ, MERGEFORGE_RECIPES=str(ws / "recipes"), MERGEFORGE_BUILD=str(ws / "build"),
               MERGEFORGE_STORE=str(ws / "cache"))
    subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py")], env=env, cwd=ws, check=True,
                   capture_output=True)
    lock = json.loads((ws / "build" / recipe.stem / "lock.json").read_text())
    return lock


def main() -> None:
    recipe = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "recipes" / "demo.yaml")
    with tempfile.TemporaryDirectory(prefix="mergeforge-repro.") as tmp:
        first, second = build(Path(tmp) / "one", recipe), build(Path(tmp) / "two", recipe)
    a, b = first["artifacts"], second["artifacts"]
    report = {
        "artifacts": len(a),
        "identical": sorted(k for k in a if k in b and a[k]["digest"] == b[k]["digest"]),
        "different": sorted(k for k in a if k not in b or a[k]["digest"] != b[k]["digest"]),
        "same_stage_keys": first["stages"] == second["stages"],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
