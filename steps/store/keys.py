"""Stage keys and what a doit run checks without hashing: the key of a stage (its kind, params, input digests,
extra key inputs and tools), where its store entry is, and whether its placed outputs are still current."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from steps.files import force_remove, read_json
from steps.hashing import StatCache, digest_value
from steps.settings import store_root
from steps.stage import Stage, declaration


def stat_cache() -> StatCache:
    return StatCache(store_root() / "statcache.json")


def stage_key(stage: Stage, cache: StatCache) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    inputs = {dep: read_json(stage.target.with_name(f"{dep.replace(':', '.', 1)}.json")) for dep in stage.deps}
    hook = declaration(stage.kind).key_inputs
    extra = hook(stage, cache) if hook is not None else {}
    material = {
        "kind": stage.kind,
        "params": stage.params,
        "inputs": {dep: {"outputs": consumed(dep, m["outputs"]),
                         **({"sources": m["sources"]} if "sources" in m else {})} for dep, m in inputs.items()},
        "files": {role: cache.digest(path) for role, path in stage.files.items()},
        "extra": extra,
        "tools": stage.tools(),
        **({"cell": stage.cell} if stage.cell else {}),   # a sweep's stage: its name and its files' names
    }
    return digest_value(material), material, inputs


def consumed(dep: str, outputs: dict[str, Any]) -> dict[str, Any]:
    """The upstream outputs a stage's key reads: what the upstream stage's declaration says (default: all)."""
    keyed = declaration(dep.split(":", 1)[0]).keyed_outputs
    return keyed(outputs) if keyed is not None else outputs


def placed_is_current(stage: Stage) -> bool:
    """doit uptodate of every stage, stat only (no hashing): each output the target lists is in build/ with its
    recorded size (the store entry's own file, when placed as a hardlink), and the store entry the key file names
    still exists with its manifest. When not, the task runs and execute() restores (or rebuilds) it."""
    try:
        outputs = read_json(stage.target)["outputs"]
        placed = read_json(stage.key_file)
    except (OSError, ValueError, KeyError):
        return False
    done = entry(str(placed.get("key", "")))
    if not (done / "manifest.json").is_file():
        return False
    recorded = placed.get("stat") or {}                 # the entry's files as published: a write in place shows
    linked = placed.get("placed") == "link"
    touched = []
    for rel, info in outputs.items():
        try:
            here, there = os.stat(stage.build_dir / rel), os.stat(done / rel)
        except OSError:
            return False
        if here.st_size != info["size"] or there.st_size != info["size"]:
            return False
        if linked and (here.st_ino, here.st_dev) != (there.st_ino, there.st_dev):
            return False
        if rel in recorded and there.st_mtime_ns != recorded[rel][1]:
            touched.append((rel, info))
    if touched:                                         # a new mtime: re-hash once (the stat cache remembers it)
        cache = stat_cache()
        try:
            same = all(cache.digest(done / rel) == info["digest"] for rel, info in touched)
        finally:
            cache.save()
        if not same:
            return False                                # the task runs: execute() quarantines and rebuilds it
    return True


def entry(key: str) -> Path:
    return store_root() / "store" / key[:2] / key


def quarantine(key: str) -> Path:
    """Move a store entry to cache/quarantine/<key> (the caller holds its key lock): never served again, kept for a
    look until `doit gc`. Returns where it went."""
    dest = store_root() / "quarantine" / key
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest, onerror=force_remove)
    if entry(key).exists():
        os.replace(entry(key), dest)
    return dest


def changed_since_publish(done: Path, manifest: dict[str, Any], cache: StatCache) -> str | None:
    """The first file of a store entry whose bytes are not what they were when the entry was published (a write
    through a hardlink in build/, or by hand), in words; None when every file is as published. A file whose size
    and mtime are as recorded at publish is taken as is; one whose mtime changed is re-hashed once (the stat cache
    remembers it), so a `touch` is not a change. An entry published before stats were recorded is not checked."""
    recorded = manifest.get("stat") or {}
    for rel, (size, mtime_ns) in recorded.items():
        path = done / rel
        try:
            st = os.stat(path)
        except OSError:
            return f"{path} is missing"
        if st.st_size != size:
            return f"{path} was changed after the entry was published ({st.st_size} bytes, published {size})"
        if st.st_mtime_ns != mtime_ns and cache.digest(path) != manifest["outputs"][rel]["digest"]:
            return f"{path} was changed after the entry was published"
    return None

