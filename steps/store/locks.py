"""Locks and leftovers: one process builds a key at a time (flock per key), one doit per build directory,
doit's state file written atomically, and temporary directories of killed builds removed."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from steps.errors import MergeforgeError
from steps.files import FULL_ERRNOS, force_remove, process_alive, tree_bytes
from steps.settings import store_root

logger = logging.getLogger(__name__)

_FULL = FULL_ERRNOS


class BuildDirBusy(MergeforgeError):
    """Another doit process holds the build directory's lock."""


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


@contextmanager
def key_lock(key: str, *, wait: bool = True, what: str = "") -> Iterator[bool]:
    """Hold cache/locks/<key>.lock (flock): one process builds or places a key at a time; a second one waits and
    then finds the entry published. With ``wait=False`` yield False at once when another process holds it. A lock
    file is only ever removed by a holder (gc), so a waiter that wakes on a removed file takes the new one."""
    locks = store_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / f"{key}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                yield False
                return
            logger.info("%s: waiting for another process that is building key %s", what or "store", key[:12])
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(fd, path):
            break
        os.close(fd)
    try:
        yield True
    finally:
        os.close(fd)


_BUILD_LOCK: dict[Path, int] = {}


def lock_build_dir(build: Path) -> None:
    """Hold <build>/.lock (flock) for the life of this process: one doit per build directory. Raises
    BuildDirBusy naming the holder's pid when another process holds it."""
    build = build.resolve()
    if build in _BUILD_LOCK:
        return
    try:
        build.mkdir(parents=True, exist_ok=True)
        fd = os.open(build / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise MergeforgeError(f"cannot lock {build}: {exc.strerror}; check the path and its permissions "
                              "(MERGEFORGE_BUILD)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = "?"
        for _ in range(20):                    # the holder writes its pid just after it locks
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if text:
                pid = text
                break
            time.sleep(0.05)
        os.close(fd)
        raise BuildDirBusy(f"another doit is building {build} (pid {pid}); wait for it to finish") from None
    try:                                       # in place, padded: no new block needed on a full disk
        os.pwrite(fd, f"{os.getpid():<12}\n".encode(), 0)
    except OSError:
        pass
    _BUILD_LOCK[build] = fd


def recover_state_file(path: Path) -> str | None:
    """doit writes its state file (.doit.json) in place at the end of a run, so a full disk or a kill during that
    write leaves it truncated, and doit would refuse every later run. Move such a file aside; every stage then
    checks itself against build/ and the store (restoring in well under a second each). Returns a notice.
    Also removes the temporary state files of runs killed while writing it."""
    for tmp in path.parent.glob(f"{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 1:-len(".tmp")]
        if pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        text = ""
    try:
        json.loads(text)
        return None
    except ValueError:
        pass
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(path, aside)
    return (f"mergeforge: notice: {path} was unreadable (a run died while writing it, e.g. on a full disk); moved "
            f"it to {aside.name}: every stage checks itself and restores from the store")


def protect_doit_state() -> None:
    """Make doit's JSON state write atomic (a new file renamed over the old one, instead of truncating the old one
    in place), and on a full disk keep the previous state with a one-line notice instead of a traceback: the
    stages this run finished then run again next time, and each restores from the store."""
    from doit import dependency

    def dump(self: Any) -> None:
        tmp = f"{self.name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(self.codec.encode(self._db))
            os.replace(tmp, self.name)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            if exc.errno not in _FULL:
                raise
            print(f"mergeforge: notice: disk full writing doit's state {self.name}; kept the previous one: the next "
                  "run checks this run's stages again (each restores from the store)", file=sys.stderr)

    dependency.JsonDB.dump = dump


def remove_stale_tmp() -> list[tuple[Path, int]]:
    """Remove cache/tmp/<kind>.<key>.<pid>.<random> directories whose process is gone and whose key is not
    locked (a killed build). Returns (directory, bytes) of each one removed."""
    tmp_root = store_root() / "tmp"
    removed: list[tuple[Path, int]] = []
    if not tmp_root.is_dir():
        return removed
    for work in sorted(tmp_root.iterdir()):
        parts = work.name.split(".")
        if len(parts) != 4 or len(parts[1]) != 64 or not parts[2].isdigit() or process_alive(int(parts[2])):
            continue
        with key_lock(parts[1], wait=False) as held:
            if held and work.exists():
                size = tree_bytes(work)
                shutil.rmtree(work, onerror=force_remove)
                removed.append((work, size))
                logger.info("removed %s, left by a build that was killed", work)
    return removed

