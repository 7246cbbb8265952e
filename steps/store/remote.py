"""The remote store (``MERGEFORGE_REMOTE``): a second, shared store behind any fsspec URL — ``file://`` (a shared
disk), ``s3://`` (s3fs; any S3 API), ``gs://`` (gcsfs), ``hf://`` (a Hub dataset repository or bucket),
``sftp://`` — laid out like the local one::

    <remote>/store/<kk>/<key>/<the entry's files>
    <remote>/store/<kk>/<key>/manifest.json        (written last: an entry without it is invisible)

The executor looks a key up here before building it and pulls it into the local store: every file lands in a
temporary directory and is checked against the manifest's blake3 digest; a file that differs is refused in one
line naming the remote object, nothing of the entry is placed, and the key is built here instead (and pushed
again over the bad object). After a build it pushes: each file first (one already there with the manifest's size
is not sent again, so a push killed half-way restarts where it stopped), the manifest last, so no reader ever sees
half an entry. An entry whose manifest is already there is not pushed again: the first machine to push a key wins,
and every later one converges on its content. Nothing here ever deletes a remote entry (``doit gc`` is local).

Options for a filesystem come from fsspec's own environment configuration, e.g. ``FSSPEC_S3_ENDPOINT_URL`` for an
S3 API server that is not AWS; credentials from the filesystem's own (``AWS_ACCESS_KEY_ID``, ``HF_TOKEN``, ...),
never from a recipe, and never written to a manifest or a log.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps import settings
from steps.errors import MergeforgeError
from steps.files import force_remove
from steps.hashing import _hash_file
from steps.settings import store_root

if TYPE_CHECKING:
    from steps.hashing import StatCache

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class RemoteError(MergeforgeError):
    """The remote store cannot be reached or read."""


def configured() -> Remote | None:
    """The remote of ``MERGEFORGE_REMOTE``, or None when unset."""
    url = settings.remote()
    return Remote(url) if url else None


def shown(url: str) -> str:
    """A URL as a log line may show it: without a password (``sftp://user:secret@host`` -> ``sftp://user@host``)."""
    if "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = url.split("://", 1)
        auth, host = rest.split("@", 1)
        return f"{scheme}://{auth.split(':', 1)[0]}@{host}"
    return url


class Remote:
    def __init__(self, url: str) -> None:
        try:
            import fsspec
            import fsspec.config
            fsspec.config.set_conf_env(fsspec.config.conf)    # FSSPEC_* read now, not only at import
            self.fs, root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise RemoteError(f"MERGEFORGE_REMOTE={shown(url)}: {exc}; install the filesystem's package (s3fs for "
                              "s3://, gcsfs for gs://, paramiko for sftp://) or fix the URL") from None
        self.url = url.rstrip("/")
        self.root = str(root).rstrip("/")

    def _path(self, key: str, rel: str = "") -> str:
        return f"{self.root}/store/{key[:2]}/{key}" + (f"/{rel}" if rel else "")

    def where(self, key: str, rel: str = "") -> str:
        """The object's URL, as a message names it."""
        return shown(f"{self.url}/store/{key[:2]}/{key}" + (f"/{rel}" if rel else ""))

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except Exception as exc:                      # s3fs, gcsfs, paramiko: each raises its own types
            raise RemoteError(f"remote store {shown(self.url)}: {what}: {type(exc).__name__}: {exc}; check "
                              "MERGEFORGE_REMOTE and the network, or unset it to build locally") from None

    def manifest(self, key: str) -> dict[str, Any] | None:
        """The entry's manifest, or None when the remote has no (complete) entry for this key."""
        try:
            text = self._call(f"reading {self.where(key, MANIFEST)}", self.fs.cat_file, self._path(key, MANIFEST))
        except FileNotFoundError:
            return None
        try:
            found = json.loads(text)
            return found if isinstance(found, dict) and found.get("key") == key else None
        except ValueError:
            return None

    def keys(self) -> set[str]:
        """Every key with a complete entry."""
        try:
            found = self._call("listing the store", self.fs.glob, f"{self.root}/store/*/*/{MANIFEST}")
        except FileNotFoundError:
            return set()
        return {str(p).rstrip("/").split("/")[-2] for p in found}

    def pull(self, key: str, what: str, cache: StatCache | None = None) -> list[str] | None:
        """Download the entry into the local store, every file checked against the manifest. Returns None when
        the remote has no entry; else the remote objects that differed ([] when the entry was placed)."""
        from steps.store.keys import entry
        manifest = self.manifest(key)
        if manifest is None:
            return None
        work = Path(tempfile.mkdtemp(prefix=f"pull.{key}.{os.getpid()}.", dir=_tmp()))
        bad: list[str] = []
        try:
            out = work / "out"
            out.mkdir()
            for rel, info in sorted(manifest["outputs"].items()):
                dest = out / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self._call(f"downloading {self.where(key, rel)}", self.fs.get_file, self._path(key, rel),
                               str(dest))
                except FileNotFoundError:
                    bad.append(f"{self.where(key, rel)} is missing")
                    continue
                if dest.stat().st_size != info["size"] or _hash_file(dest) != info["digest"]:
                    bad.append(f"{self.where(key, rel)} differs from its manifest (blake3 {info['digest'][:12]}..., "
                               f"{info['size']} bytes)")
            if bad:
                for line in bad:
                    logger.warning("mergeforge: %s: remote object %s; not placed, building it here", what, line)
                return bad
            published = {}
            for rel in manifest["outputs"]:
                path = out / rel
                path.chmod(0o444)
                st = path.stat()
                published[rel] = [st.st_size, st.st_mtime_ns]
                if cache is not None:                    # hashed once, here: a rename keeps the stat
                    cache.remember(path, manifest["outputs"][rel]["digest"])
            local = {**manifest, "stat": published, "pulled_from": shown(self.url)}
            (out / MANIFEST).write_text(json.dumps(local, indent=1, sort_keys=True))
            dest = entry(key)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():                            # an incomplete entry (no manifest): replace it
                shutil.rmtree(dest, onerror=force_remove)
            os.replace(out, dest)
            return []
        finally:
            shutil.rmtree(work, onerror=force_remove)

    def push(self, key: str, what: str, *, force: bool = False) -> int:
        """Upload a local store entry: files first, the manifest last. Skips an entry the remote has (unless
        ``force``: a rebuild over objects a pull refused) and each file already there with its size. Returns the
        bytes sent."""
        from steps.store.keys import entry
        done = entry(key)
        manifest = json.loads((done / MANIFEST).read_text())
        if not force and self.manifest(key) is not None:
            return 0
        sent = 0
        for rel, info in sorted(manifest["outputs"].items()):
            target = self._path(key, rel)
            if not force:
                try:
                    if self._call(f"checking {self.where(key, rel)}", self.fs.size, target) == info["size"]:
                        continue                        # landed in an earlier, interrupted push
                except FileNotFoundError:
                    pass
            parent = target.rsplit("/", 1)[0]
            self._call(f"creating {parent}", self.fs.makedirs, parent, True)
            self._call(f"uploading {self.where(key, rel)}", self.fs.put_file, str(done / rel), target)
            sent += int(info["size"])
        shared = {k: v for k, v in manifest.items() if k not in ("stat", "pulled_from")}   # this machine's facts
        self._call(f"creating {self.where(key)}", self.fs.makedirs, self._path(key), True)
        self._call(f"uploading {self.where(key, MANIFEST)}", self.fs.pipe_file, self._path(key, MANIFEST),
                   json.dumps(shared, indent=1, sort_keys=True).encode())
        logger.info("%s pushed to %s (%d bytes sent)", what, shown(self.url), sent)
        return sent

    def verify(self, full: bool = False) -> tuple[list[str], int]:
        """Every remote entry's files against its manifest: present with their sizes, and with ``full`` their
        blake3 (each file downloaded to a temporary file and hashed). Returns one line per bad object and the
        number of entries checked. Reports only: it deletes nothing."""
        problems: list[str] = []
        keys = sorted(self.keys())
        for key in keys:
            manifest = self.manifest(key)
            if manifest is None:
                problems.append(f"mergeforge: remote: {self.where(key, MANIFEST)} is unreadable")
                continue
            for rel, info in sorted(manifest["outputs"].items()):
                try:
                    size = self._call(f"checking {self.where(key, rel)}", self.fs.size, self._path(key, rel))
                except FileNotFoundError:
                    problems.append(f"mergeforge: remote: {self.where(key, rel)} is missing "
                                    f"({manifest.get('stage', '?')})")
                    continue
                if size != info["size"]:
                    problems.append(f"mergeforge: remote: {self.where(key, rel)} is {size} bytes where its manifest "
                                    f"says {info['size']} ({manifest.get('stage', '?')})")
                elif full:
                    with tempfile.TemporaryDirectory(dir=_tmp()) as tmp:
                        local = Path(tmp) / "object"
                        self._call(f"downloading {self.where(key, rel)}", self.fs.get_file, self._path(key, rel),
                                   str(local))
                        if _hash_file(local) != info["digest"]:
                            problems.append(f"mergeforge: remote: {self.where(key, rel)} differs from its manifest "
                                            f"({manifest.get('stage', '?')}); the next build that pulls it builds "
                                            "it here and pushes it again")
        return problems, len(keys)


def _tmp() -> Path:
    path = store_root() / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def push_all() -> list[str]:
    """`doit push`: every complete local store entry the remote lacks, one line each, then a summary."""
    remote = _required("push")
    from steps.store.keys import entry
    lines = []
    have = remote.keys()
    local = sorted(p.name for p in (store_root() / "store").glob("*/*") if (p / MANIFEST).is_file())
    sent = 0
    for key in local:
        if key in have:
            continue
        stage = json.loads((entry(key) / MANIFEST).read_text()).get("stage", "?")
        n = remote.push(key, stage)
        sent += n
        lines.append(f"push: {stage} (key {key[:12]}): {n} bytes")
    lines.append(f"push: {len(lines)} entries pushed to {shown(remote.url)} ({sent} bytes); "
                 f"{len(local) - len(lines)} already there")
    return lines


def _required(command: str) -> Remote:
    remote = configured()
    if remote is None:
        raise RemoteError(f"doit {command}: no remote store; set MERGEFORGE_REMOTE to its URL (file:///shared/mf, "
                          "s3://bucket/prefix, hf://datasets/org/name, ...)")
    return remote
