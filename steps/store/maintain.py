"""`doit verify` and `doit gc`: re-hash the store and build/ against their manifests (quarantining what is
corrupt), and remove store entries no current build needs."""
from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import Any

from steps import constants as C
from steps.files import force_remove, human, read_json, tree_bytes
from steps.hashing import _hash_file
from steps.plan import plan
from steps.settings import build_root, store_root
from steps.store.keys import entry, stat_cache
from steps.store.keys import quarantine as quarantine_entry
from steps.store.locks import _same_file, key_lock, remove_stale_tmp


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


def verify(recipes: list[Any], full: bool = False, remote: bool = False) -> tuple[list[str], str]:
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

    for key, files in sorted(bad.items()):
        with key_lock(key, wait=False) as held:
            if not held:
                problems.append(f"mergeforge: corrupt: store entry {entry(key)} ({stage_of.get(key, '?')}) is in "
                                "use by another process; run doit verify again when it is done")
                continue
            dest = quarantine_entry(key)
        for rel, reason in files:
            where = [str(d / rel) for d in placements.get(key, [])] or [str(entry(key) / rel)]
            problems.append(f"mergeforge: corrupt: {', '.join(where)} ({stage_of.get(key, '?')}, store entry "
                            f"{key[:12]}): {reason}; moved the entry to {dest} and its files out of build/; run "
                            "doit to rebuild it")
    cache.save()
    remote_part = ""
    if remote:
        from steps.store.remote import _required, shown
        there = _required("verify --remote")
        remote_problems, n_remote = there.verify(full=full)
        problems += remote_problems
        remote_part = f"; {n_remote} remote entries at {shown(there.url)} ({'read' if full else 'sizes'})"
    seconds = time.time() - started
    how = f"read {hashed[0]} files, {human(hashed[1])}" if full else "stat-cached"
    summary = (f"verify: {n_files} files in {n_entries} store entries and {n_placed} placed artifacts checked "
               f"({how}){remote_part} in {seconds:.2f} s: {len(problems)} bad")
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
            size, last = tree_bytes(done), tree_bytes(done, only_last_link=True)
            shutil.rmtree(done, onerror=force_remove)
        removed += 1
        freed += last
        linked += size - last
        lines.append(f"gc: removed {stage_id} entry {done.name[:12]} ({human(last)} freed"
                     + (f", {human(size - last)} still linked from a build directory)" if size > last else ")"))
    for work, size in remove_stale_tmp():
        freed += size
        lines.append(f"gc: removed {work.name} (a killed build, {human(size)})")
    for old in sorted((root / "quarantine").glob("*")) if (root / "quarantine").is_dir() else ():
        size = tree_bytes(old, only_last_link=True)
        shutil.rmtree(old, onerror=force_remove)
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



def pull(recipes: list[Any]) -> tuple[list[str], bool]:
    """`doit pull`: every stage the recipes need, in build order, from the local store or the remote, without
    building any. A stage the remote lacks is named with what it holds back (its downstream keys depend on its
    outputs). Returns the lines and whether everything was placed."""
    from steps.store.executor import NotAvailable, execute
    from steps.store.remote import _required
    remote = _required("pull")
    lines: list[str] = []
    counts: dict[str, int] = {}
    missing: set[str] = set()
    for recipe in recipes:
        for st in plan(recipe):
            if missing & set(st.deps):
                missing.add(st.id)
                continue
            try:
                action = execute(st, build=False)
            except NotAvailable as exc:
                missing.add(st.id)
                lines.append(f"pull: {exc}; build it with `doit {st.id}` (and `doit push` to share it)")
                continue
            counts[action] = counts.get(action, 0) + 1
    held = len(missing) - sum(1 for line in lines if line.startswith("pull: "))
    summary = (f"pull: {counts.get('pulled', 0)} stages pulled from {remote.url.split('://', 1)[0]}://..., "
               f"{counts.get('restored', 0)} restored from the local store, {len(missing)} not available"
               + (f" ({held} of them wait for a stage above)" if held else ""))
    return [*lines, summary], not missing
