"""The content-keyed store and the stage executor.

A stage's key hashes its kind, its normalized recipe subtree, the digests of its inputs (upstream outputs,
small input files) and its tool versions. ``execute`` restores a key already in the store (hardlinks into
build/<recipe>/) or builds the stage in a temporary directory, hashes what it wrote, publishes it into the store
read-only with one atomic rename, and then places it. The stage's doit target, a small manifest of output digests
only, is written last: its bytes change only when an output's bytes change, which gives early cutoff downstream.

    cache/store/<kk>/<key>/manifest.json + the stage's files     (complete once the directory exists)
    build/<recipe>/<artifact>                                     (hardlinks into the store)
    build/<recipe>/.mf/<kind>.<name>.json                         (doit target: output digests)
    build/<recipe>/.mf/events.jsonl                               (what each run built or restored, and how long)
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps import constants as C
from steps.hashing import StatCache, digest_value, tree_digests
from steps.plan import Stage, plan, store_root

logger = logging.getLogger(__name__)


def stat_cache() -> StatCache:
    return StatCache(store_root() / "statcache.json")


@dataclass
class Context:
    """What a stage's build function gets: where to write, and what its inputs are."""
    stage: Stage
    key: str
    out: Path                                     # temporary directory: write every output here
    inputs: dict[str, dict[str, Any]]             # upstream stage id -> its target manifest
    cache: StatCache
    record: dict[str, Any] = field(default_factory=dict)   # extra facts for the target (e.g. source revisions)

    def upstream(self, kind: str) -> dict[str, Any]:
        return self.inputs[f"{kind}:{self.stage.recipe.name}"]

    def upstream_file(self, kind: str) -> str:
        """The one artifact an upstream single-file stage (convert, imatrix) produced."""
        (name,) = self.upstream(kind)["outputs"]
        return str(name)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _module(kind: str) -> Any:
    return importlib.import_module(f"steps.{kind}")


def stage_key(stage: Stage, cache: StatCache) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    inputs = {dep: read_json(stage.target.with_name(f"{dep.replace(':', '.', 1)}.json")) for dep in stage.deps}
    module = _module(stage.kind)
    extra = module.key_inputs(stage, cache) if hasattr(module, "key_inputs") else {}
    material = {
        "kind": stage.kind,
        "params": stage.params,
        "inputs": {dep: {"outputs": m["outputs"], **({"sources": m["sources"]} if "sources" in m else {})}
                   for dep, m in inputs.items()},
        "files": {role: cache.digest(path) for role, path in stage.files.items()},
        "extra": extra,
        "tools": stage.tools(),
    }
    return digest_value(material), material, inputs


def fetch_is_current(stage: Stage) -> bool:
    """doit uptodate of a fetch task: local sources still have the digests the target recorded (stat-cached)."""
    if not stage.target.exists():
        return False
    recorded = read_json(stage.target).get("sources", {})
    cache = stat_cache()
    current = _module("fetch").key_inputs(stage, cache)
    cache.save()
    return all(recorded.get(name, {}).get("files") == files for name, files in current.items())


def entry(key: str) -> Path:
    return store_root() / "store" / key[:2] / key


def execute(stage: Stage) -> None:
    """doit action of every stage: restore from the store, or build and publish."""
    started = time.time()
    cache = stat_cache()
    key, material, inputs = stage_key(stage, cache)
    done = entry(key)
    action = "restored"
    if not (done / "manifest.json").exists():
        action = "built"
        _build(stage, key, material, inputs, cache)
    manifest = read_json(done / "manifest.json")
    _place(stage, done, manifest["outputs"], cache)
    write_json_atomic(stage.key_file, {"key": key})
    write_json_atomic(stage.target, {"schema": C.SCHEMA_VERSION, "stage": stage.id,
                                     "outputs": manifest["outputs"], **manifest.get("record", {})})
    cache.save()
    seconds = round(time.time() - started, 3)
    with open(stage.build_dir / C.MANIFEST_DIR / "events.jsonl", "a") as log:
        log.write(json.dumps({"stage": stage.id, "action": action, "key": key, "seconds": seconds,
                              "at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    logger.info("%s %s in %.2f s (key %s)", stage.id, action, seconds, key[:12])
    write_lock(stage)


def _build(stage: Stage, key: str, material: dict[str, Any], inputs: dict[str, dict[str, Any]],
           cache: StatCache) -> None:
    tmp_root = store_root() / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{stage.kind}.{key[:12]}.", dir=tmp_root))
    try:
        ctx = Context(stage, key, work / "out", inputs, cache)
        ctx.out.mkdir()
        started = time.time()
        _module(stage.kind).build(ctx)
        seconds = round(time.time() - started, 3)
        outputs = tree_digests(ctx.out, cache)
        for rel in outputs:
            path = ctx.out / rel
            path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        manifest = {"schema": C.SCHEMA_VERSION, "key": key, "stage": stage.id, "material": material,
                    "outputs": outputs, "record": ctx.record, "build_seconds": seconds}
        (ctx.out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        dest = entry(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():                      # an incomplete entry (no manifest): replace it
            shutil.rmtree(dest, onerror=_force_remove)
        os.replace(ctx.out, dest)
    finally:
        shutil.rmtree(work, onerror=_force_remove)


def _force_remove(func: Any, path: str, _exc: Any) -> None:
    """rmtree's retry for a read-only directory entry."""
    os.chmod(os.path.dirname(path), 0o755)
    if os.path.isdir(path):
        os.chmod(path, 0o755)
    func(path)


def _place(stage: Stage, done: Path, outputs: dict[str, Any], cache: StatCache) -> None:
    """Hardlink the entry's files into build/<recipe>/ (copy across filesystems), each atomically."""
    build_dir = stage.build_dir
    owned_dirs = {rel.split("/", 1)[0] for rel in outputs if "/" in rel}
    for top in owned_dirs:                     # drop files a previous version of this stage left behind
        for old in (build_dir / top).rglob("*") if (build_dir / top).is_dir() else ():
            if old.is_file() and old.relative_to(build_dir).as_posix() not in outputs:
                old.unlink()
    for rel, info in outputs.items():
        src, dest = done / rel, build_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() and os.path.samefile(src, dest):
            continue
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            cache.remember(tmp, info["digest"])
        os.replace(tmp, dest)


def write_lock(stage: Stage) -> None:
    """build/<recipe>/lock.json: every artifact's digest and stage key, every source's revision."""
    recipe = stage.recipe
    build_dir = stage.build_dir
    artifacts: dict[str, Any] = {}
    sources: dict[str, Any] = {}
    stages: dict[str, str] = {}
    for st in plan(recipe):
        if not st.target.exists() or not st.key_file.exists():
            continue
        target = read_json(st.target)
        stages[st.id] = read_json(st.key_file)["key"]
        for rel, info in target["outputs"].items():
            artifacts[rel] = {**info, "stage": st.id}
        sources.update(target.get("sources", {}))
    write_json_atomic(build_dir / C.LOCK_FILE, {
        "schema": C.SCHEMA_VERSION, "recipe": recipe.name, "recipe_file": recipe.file.name,
        "sources": sources, "stages": stages, "artifacts": artifacts})
