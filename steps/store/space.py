"""Disk space: the estimate a stage declares, checked before it builds or places, and one line for a disk that
fills anyway."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from steps.errors import MergeforgeError
from steps.files import FULL_ERRNOS, human
from steps.settings import store_root
from steps.stage import Stage, declaration

_FULL = FULL_ERRNOS
SMALL_OUTPUT = 1 << 20                    # space asked for a stage that writes little (imatrix, bench, fetch)



class DiskFull(MergeforgeError):
    """Not enough free space to build or place a stage (checked before, or ENOSPC while writing)."""


def check_space(path: Path, needed: int, what: str) -> None:
    """Refuse with one line when the filesystem of ``path`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(path).free
    if needed > free:
        raise DiskFull(f"{what}: not enough disk space in {path}: needs about {human(needed)}, {human(free)} "
                       "free; free some space (`doit gc` removes old store entries) and run doit again")



def estimate_bytes(stage: Stage, inputs: dict[str, dict[str, Any]]) -> int:
    """About how many bytes a stage writes, as its declaration estimates (a stage without one, or whose estimate
    cannot read what it needs, writes little). An estimate: a stage that writes more still fails cleanly on
    ENOSPC."""
    estimate = declaration(stage.kind).estimate_bytes
    if estimate is None:
        return SMALL_OUTPUT
    try:
        return max(SMALL_OUTPUT, int(estimate(stage, inputs)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return SMALL_OUTPUT


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds ``path`` (the disk a message should name)."""
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def disk_full(stage: Stage, exc: OSError, where: Path, needed: int | None = None) -> DiskFull:
    """One line for a disk that filled while a stage wrote: the file being written (a copy's destination, not its
    source), the filesystem that is full, and its free space now."""
    place = Path(getattr(exc, "filename2", None) or exc.filename or where)
    placing = re.fullmatch(r"\.(.+)\.\d+\.tmp", place.name)         # a placement's temporary name: say the file
    if placing:
        place = place.with_name(placing.group(1))
    probe = next((p for p in (place, *place.parents) if p.exists()), store_root())
    free = shutil.disk_usage(probe).free
    estimate = f", the estimate was {human(needed)}" if needed else ""
    return DiskFull(f"{stage.id}: disk full writing {place} (the filesystem at {mount_point(probe)}); nothing "
                    f"half-written was left ({human(free)} free now{estimate}); free some space (`doit gc` removes "
                    "old store entries) and run doit again")
