"""Content digests: blake3 of large files through a stat cache, and stable digests of JSON-able values.

The stat cache maps (device, inode, size, mtime_ns) to a digest, so an unchanged 30 GB file is hashed once and
hardlinked copies of it (store and build/) share one entry. ``touch`` changes mtime, so a touched file is hashed
again once, and gives the same digest.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import blake3

ALGO = "blake3"
_CHUNK = 16 << 20
_lock = threading.Lock()


def digest_value(value: Any) -> str:
    """Digest of a JSON-able value, independent of key order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return blake3.blake3(text.encode()).hexdigest()


def _hash_file(path: Path) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class StatCache:
    """Persistent (dev, inode, size, mtime_ns) -> digest map in one small JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, str] | None = None
        self._dirty = False

    @staticmethod
    def _stat_key(path: Path) -> str:
        st = path.stat()
        return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def _load(self) -> dict[str, str]:
        if self._entries is None:
            try:
                self._entries = json.loads(self.path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                self._entries = {}
        return self._entries

    def digest(self, path: Path) -> str:
        key = self._stat_key(path)
        with _lock:
            entries = self._load()
            if key in entries:
                return entries[key]
        value = _hash_file(path)
        self.remember(path, value)
        return value

    def remember(self, path: Path, value: str) -> None:
        with _lock:
            self._load()[self._stat_key(path)] = value
            self._dirty = True

    def save(self) -> None:
        with _lock:
            if not self._dirty or self._entries is None:
                return
            live = self._entries
            if len(live) > 100_000:  # bounded: drop the oldest half
                live = dict(list(live.items())[len(live) // 2:])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(live))
            os.replace(tmp, self.path)
            self._dirty = False


def model_files(root: Path) -> list[Path]:
    """Every file under a model directory, sorted, refusing links that lead out of it.

    A link may point inside the directory, or into the ``blobs/`` of the Hugging Face cache repository the
    directory is a snapshot of (``models--org--name/snapshots/<rev>/`` links to ``../../blobs/<sha>``). Any other
    link (``tokenizer.json -> /etc/passwd``), a dangling link or a link to something that is not a regular file
    raises UnsafePath naming it. Linked directories are not followed.
    """
    from steps.errors import UnsafePath
    real_root = root.resolve()
    allowed = [real_root]
    if real_root.parent.name == "snapshots":
        allowed.append((real_root.parent.parent / "blobs").resolve())
    found: list[Path] = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if not path.is_symlink():
                if name in files:
                    found.append(path)
                continue
            rel = path.relative_to(root).as_posix()
            target = path.resolve()
            if not any(target == a or a in target.parents for a in allowed):
                raise UnsafePath(f"{rel} in {root} links to {target}, outside the model directory; replace the "
                                 "link by the file itself, or remove it")
            if name in dirs:
                continue
            if not target.is_file():
                raise UnsafePath(f"{rel} in {root} is a link to {target}, which is missing or not a file; "
                                 "download the model again")
            found.append(path)
    return sorted(found)


def tree_digests(root: Path, cache: StatCache, *, links: bool = False) -> dict[str, dict[str, Any]]:
    """{relative path: {size, digest}} of every file under root, in sorted order. With ``links``, a source model
    directory: links are followed where model_files allows them, refused elsewhere."""
    files = model_files(root) if links else sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    out: dict[str, dict[str, Any]] = {}
    for path in files:
        out[path.relative_to(root).as_posix()] = {"size": path.stat().st_size, "digest": cache.digest(path)}
    return out
