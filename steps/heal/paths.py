"""Where a heal stage's files are (the merged model it reads, its work directories in the store), and the
RecipeError that names a key of its recipe."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from steps import constants as C
from steps.errors import RecipeError

if TYPE_CHECKING:
    from steps.stage import Stage


def work_root() -> Path:
    from steps.settings import store_root
    return store_root() / "work"


def work_dir(key: str) -> Path:
    """Checkpoints of the heal with this stage key: a killed run resumes from here."""
    return work_root() / f"heal.{key}"


def merged_dir(stage: Stage) -> Path:
    """build/<recipe>/merged, or in a sweep the merged model of the cell's merge (``merged@<its settings>``)."""
    merge = next((d.split(":", 1)[1] for d in stage.deps if d.startswith("merge:")), stage.recipe.name)
    return stage.build_dir / (C.MERGED_DIR + merge[len(stage.recipe.name):])


def _fail(stage: Stage, key: str, message: str) -> RecipeError:
    return RecipeError(str(stage.recipe.file), key, message)
