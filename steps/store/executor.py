"""The executor: restore a stage's key from the store, or build it in a temporary directory, hash what it
wrote, publish it read-only with one rename, and place it into build/<recipe>/; the doit target last."""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from steps import constants as C
from steps.files import force_remove, read_json, write_json_atomic
from steps.hashing import StatCache, tree_digests
from steps.plan import plan
from steps import settings
from steps.settings import store_root
from steps.stage import Context, Stage, declaration
from steps.errors import MergeforgeError, StepFailed
from steps.store.keys import changed_since_publish, entry, quarantine, stage_key, stat_cache
from steps.store.locks import key_lock, remove_stale_tmp
from steps.store import cluster
from steps.store.remote import RemoteError, configured
from steps.store.space import _FULL, SMALL_OUTPUT, check_space, disk_full, estimate_bytes

logger = logging.getLogger(__name__)

FICLONE = 0x40049409                      # linux/fs.h: _IOW(0x94, 9, int)


_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EBADF, errno.EPERM}



class NotAvailable(MergeforgeError):
    """`doit pull`: the key is neither in the local store nor on the remote."""


def execute(stage: Stage, _repairs: int = 0, *, build: bool = True) -> str:
    """doit action of every stage: restore from the store, else pull from the remote store (MERGEFORGE_REMOTE),
    else build, publish (and push). A store entry changed since it was published is quarantined and rebuilt; an
    input in build/ that differs from its manifest is never built on: its stage is restored (or rebuilt) first.
    ``build=False`` (`doit pull`): raise NotAvailable instead of building. Returns the action: restored, pulled or
    built."""
    started = time.time()
    cache = stat_cache()
    key, material, inputs = stage_key(stage, cache)
    remove_stale_tmp()
    done = entry(key)
    action = "restored"
    needed: int | None = None
    where = stage.build_dir
    try:
        with key_lock(key, what=stage.id):
            if (done / "manifest.json").exists():
                changed = changed_since_publish(done, read_json(done / "manifest.json"), cache)
                if changed:
                    logger.warning("mergeforge: %s: %s; quarantined store entry %s (now %s) and building it "
                                   "again", stage.id, changed, key[:12], quarantine(key))
            remote = configured()
            refused: list[str] = []
            job: str | None = None
            if not (done / "manifest.json").exists() and remote is not None:
                got = remote.pull(key, stage.id, cache)
                if got == []:
                    action = "pulled"
                elif got:
                    refused = got
            if not (done / "manifest.json").exists():
                if not build:
                    raise NotAvailable(f"{stage.id}: key {key[:12]} is in neither the local store nor the remote"
                                       + (" (its remote objects differ from their manifest)" if refused else ""))
                if _repair_inputs(stage, inputs, cache):
                    if _repairs >= 2:
                        raise MergeforgeError(f"{stage.id}: its inputs still differ from their manifests after "
                                              "restoring them; run doit verify --full")
                    raise _Retry
                action = "built"
                late_check = declaration(stage.kind).check
                if late_check is not None:
                    late_check(stage, inputs)
                if cluster.wanted(stage):           # built by a job elsewhere, handed back through the remote
                    job = cluster.run(stage, key, job_main)
                else:
                    needed = estimate_bytes(stage, inputs)
                    tmp_root = store_root() / "tmp"
                    tmp_root.mkdir(parents=True, exist_ok=True)
                    where = tmp_root
                    check_space(tmp_root, needed, stage.id)
                    _build(stage, key, material, inputs, cache, needed)
                if remote is not None and job is None:
                    try:
                        remote.push(key, stage.id, force=bool(refused))
                    except RemoteError as exc:      # built here all the same: `doit push` sends it later
                        logger.warning("mergeforge: %s: built, not pushed: %s; run doit push once it is reachable",
                                       stage.id, exc)
            elif action == "restored":
                try:
                    os.utime(done)             # last used: gc keeps the most recently used entries
                except OSError:
                    pass
            manifest = read_json(done / "manifest.json")
            where = stage.build_dir
            stage.build_dir.mkdir(parents=True, exist_ok=True)
            if os.stat(done).st_dev != os.stat(stage.build_dir).st_dev:   # placing copies the bytes
                needed = sum(int(i["size"]) for i in manifest["outputs"].values())
                check_space(stage.build_dir, needed, stage.id)
            placed = _place(stage, done, manifest["outputs"], cache)
        write_json_atomic(stage.key_file, {"key": key, "placed": placed, "stat": manifest.get("stat", {})})
        write_json_atomic(stage.target, {"schema": C.SCHEMA_VERSION, "stage": stage.id,
                                         "outputs": manifest["outputs"], **manifest.get("record", {})})
        cache.save()
        seconds = round(time.time() - started, 3)
        with open(stage.build_dir / C.MANIFEST_DIR / "events.jsonl", "a") as log:
            log.write(json.dumps({"stage": stage.id, "action": action, "key": key, "seconds": seconds,
                                  "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  **({"job": f"{settings.cluster()} {job}"} if job else {})}) + "\n")
        logger.info("%s %s in %.2f s (key %s)", stage.id, action, seconds, key[:12])
        write_lock(stage)
        return action
    except _Retry:
        return execute(stage, _repairs + 1, build=build)
    except OSError as exc:
        if exc.errno in _FULL:
            raise disk_full(stage, exc, where, needed) from None
        raise


class _Retry(Exception):
    """An input was restored: the stage's key is computed again."""


def _repair_inputs(stage: Stage, inputs: dict[str, dict[str, Any]], cache: StatCache) -> bool:
    """Check every input file in build/ against its upstream manifest before building on it (stat-cached: free
    when nothing changed; a changed stat means a re-hash). A file that differs is named in one line; its store
    entry is quarantined when the file is that entry's own (a hardlink), the upstream's placed files leave
    build/, and the upstream stage is restored or rebuilt. True when something was repaired."""
    repaired = False
    for dep, manifest in inputs.items():
        bad = None
        for rel, info in manifest["outputs"].items():
            path = stage.build_dir / rel
            try:
                same = path.stat().st_size == info["size"] and cache.digest(path) == info["digest"]
            except OSError:
                same = False
            if not same:
                bad = path
                break
        if bad is None:
            continue
        upstream = next((st for st in plan(stage.recipe.sweep or stage.recipe) if st.id == dep), None)
        if upstream is None:
            continue
        try:
            placed = read_json(upstream.key_file)["key"]
        except (OSError, ValueError, KeyError):
            placed = ""
        where = "restoring it"
        source = entry(placed) / bad.relative_to(stage.build_dir) if placed else None
        if source is not None and source.exists() and bad.exists() and os.path.samefile(source, bad):
            with key_lock(placed, what=dep):
                where = f"its store entry {placed[:12]} held the same bytes: quarantined it ({quarantine(placed)}), " \
                        "rebuilding it"
        logger.warning("mergeforge: %s: input %s differs from its manifest (%s); not building on it: %s", stage.id,
                       bad, dep, where)
        for rel in manifest["outputs"]:
            (stage.build_dir / rel).unlink(missing_ok=True)
        upstream.key_file.unlink(missing_ok=True)
        execute(upstream)
        repaired = True
    return repaired


def _build(stage: Stage, key: str, material: dict[str, Any], inputs: dict[str, dict[str, Any]],
           cache: StatCache, needed: int = 0) -> None:
    tmp_root = store_root() / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{stage.kind}.{key}.{os.getpid()}.", dir=tmp_root))
    try:
        ctx = Context(stage, key, work / "out", inputs, cache)
        ctx.out.mkdir()
        started = time.time()
        try:
            declaration(stage.kind).build(ctx)
        except Exception as exc:
            # a llama.cpp program, or a library writing through its own code (safetensors, torch.save), that ran
            # out of space says so in its own words, or as a traceback: a full disk is the cause to report
            if isinstance(exc, OSError) and exc.errno in _FULL:
                raise                              # execute() names the file it was writing
            if _says_disk_full(exc) or shutil.disk_usage(work).free < SMALL_OUTPUT:
                raise disk_full(stage, OSError(errno.ENOSPC, "no space left", str(work)), work, needed) from exc
            raise
        seconds = round(time.time() - started, 3)
        outputs = tree_digests(ctx.out, cache)
        published = {}
        for rel in outputs:
            path = ctx.out / rel
            path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            st = path.stat()
            published[rel] = [st.st_size, st.st_mtime_ns]     # a rename keeps both: placing checks them
        manifest = {"schema": C.SCHEMA_VERSION, "key": key, "stage": stage.id, "material": material,
                    "outputs": outputs, "record": ctx.record, "build_seconds": seconds, "stat": published}
        (ctx.out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        dest = entry(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():                      # an incomplete entry (no manifest): replace it
            shutil.rmtree(dest, onerror=force_remove)
        os.replace(ctx.out, dest)
    finally:
        shutil.rmtree(work, onerror=force_remove)


_FULL_WORDS = tuple(os.strerror(code) for code in _FULL)      # "No space left on device", "Disk quota exceeded"


def _says_disk_full(exc: BaseException) -> bool:
    """An error of a library's own type (safetensors' SafetensorError, torch's RuntimeError, a llama.cpp program's
    StepFailed) that says, in its words or its cause, that the disk was full. A writer that removes its partial file
    leaves the disk with space again, so the words are what is left to go on."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in _FULL or any(w in str(seen) for w in _FULL_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


_REFLINK: dict[tuple[int, int], bool] = {}


def _clone(src: Path, dest: Path) -> str:
    """``dest`` as a new file with ``src``'s bytes: a copy-on-write reflink where the filesystem can (btrfs, XFS,
    ...; a write through build/ then leaves the store intact), else a hardlink (no extra space; a write through
    build/ changes the store entry too, which `doit verify` finds), else a copy (another filesystem)."""
    devices = (os.stat(src).st_dev, os.stat(dest.parent).st_dev)
    if _REFLINK.get(devices, True):
        try:
            with open(src, "rb") as fsrc, open(dest, "xb") as fdest:
                fcntl.ioctl(fdest.fileno(), FICLONE, fsrc.fileno())
            return "reflink"
        except OSError as exc:
            dest.unlink(missing_ok=True)
            if exc.errno not in _NO_REFLINK:
                raise
            _REFLINK[devices] = False
    try:
        os.link(src, dest)
        return "link"
    except OSError as exc:
        if exc.errno in _FULL:
            raise
    shutil.copyfile(src, dest)
    return "copy"


def _place(stage: Stage, done: Path, outputs: dict[str, Any], cache: StatCache) -> str:
    """Place the entry's files into build/<recipe>/, each atomically and read-only. Returns how: "reflink",
    "link", "copy" ("mixed" when they differ, "none" for a stage without outputs)."""
    build_dir = stage.build_dir
    owned_dirs = {rel.split("/", 1)[0] for rel in outputs if "/" in rel}
    for top in owned_dirs:                     # drop files a previous version of this stage left behind
        for old in (build_dir / top).rglob("*") if (build_dir / top).is_dir() else ():
            if old.is_file() and old.relative_to(build_dir).as_posix() not in outputs:
                old.unlink()
    modes: set[str] = set()
    for rel, info in outputs.items():
        src, dest = done / rel, build_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        for stale in dest.parent.glob(f".{dest.name}.*.tmp"):   # left by a killed run (this dir is locked)
            stale.unlink(missing_ok=True)
        if dest.exists() and os.path.samefile(src, dest):
            modes.add("link")
            continue
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            mode = _clone(src, tmp)
            if mode != "link":
                tmp.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
                cache.remember(tmp, info["digest"])
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        modes.add(mode)
    return modes.pop() if len(modes) == 1 else ("mixed" if modes else "none")


def write_lock(stage: Stage) -> None:
    """build/<recipe>/lock.json: every artifact's digest and stage key, every source's revision."""
    recipe = stage.recipe.sweep or stage.recipe        # a sweep's cell: the lock covers the whole sweep
    build_dir = stage.build_dir
    (build_dir / C.MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
    with open(build_dir / C.MANIFEST_DIR / "lock.json.lock", "a") as held:   # doit -n: one writer at a time
        fcntl.flock(held, fcntl.LOCK_EX)
        _write_lock(recipe, build_dir)


def _write_lock(recipe: Any, build_dir: Path) -> None:
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


def job_main(recipe_file: str, stage_id: str, key: str, workspace: str) -> str:
    """What the job runs: in a workspace of its own, pull the stage's upstream stages, build the stage (the
    executor pushes it), and check that it built the key the submitter asked for."""
    settings.job_environment(Path(workspace))          # the job builds the stage itself, in its own workspace
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    from steps.recipe import load
    recipe = load(recipe_file)
    stages = {st.id: st for st in plan(recipe)}
    target = stages[stage_id]
    needed: list[str] = []

    def visit(sid: str) -> None:
        for dep in stages[sid].deps:
            visit(dep)
        if sid not in needed:
            needed.append(sid)
    visit(stage_id)
    for sid in needed[:-1]:
        execute(stages[sid], build=False)
    built_key = stage_key(target, stat_cache())[0]
    if built_key != key:
        raise StepFailed(f"{stage_id}: the job computes key {built_key[:12]}, the submitter {key[:12]}: the recipe "
                         "or a tool version differs between the two machines")
    action = execute(target)
    print(f"{stage_id} {action} in the job (key {key[:12]})", flush=True)
    return action
