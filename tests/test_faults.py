"""Faults: corruption, deleted outputs and store entries, concurrent runs, killed stages, a full disk.

Each test ends with the promise kept (the build restored or rebuilt, byte for byte) or a clear one-line refusal;
nothing corrupt is ever served. They run fetch + merge only (no llama.cpp) on the tiny model of conftest. A full
disk is a real tmpfs (`mount -t tmpfs`, root only: skipped elsewhere), never a faked free-space figure.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import ROOT, Workspace, assert_nothing_half_written, assert_refused

MERGED = "build/tiny/merged/model.safetensors"
Mount = Callable[[str, str], Path]


def merge_recipe(model: Path, slices: tuple[tuple[int, int], ...] = ((0, 3), (1, 4)), extra: str = "") -> str:
    lines = "\n".join(f"    - sources: [{{model: a, layer_range: [{a}, {b}]}}]" for a, b in slices)
    return f"sources:\n  a: {{path: {model}}}\nmerge:\n  merge_method: passthrough\n  dtype: bfloat16\n{extra}" \
           f"  slices:\n{lines}\n"


def built_counts(*workspaces: Workspace) -> Counter[str]:
    return Counter(str(e["stage"]) for ws in workspaces for e in ws.events("tiny") if e["action"] == "built")


def mf_lines(output: str) -> list[str]:
    return list(dict.fromkeys(line for line in output.splitlines() if line.startswith("mergeforge: ")))


def flip_byte(path: Path, offset: int = 4096) -> None:
    """What a stray write through build/ does: the same inode, one byte changed, a new mtime."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def blake3_of(path: Path) -> str:
    from steps.hashing import _hash_file
    return _hash_file(path)


def store_file(ws: Workspace, stage: str, rel: str) -> Path:
    key = json.loads((ws.build / "tiny" / ".mf" / f"{stage}.key").read_text())["key"]
    return ws.store / "store" / key[:2] / key / rel


@pytest.fixture
def merged(workspace: Workspace, tiny_llama: Path) -> Workspace:
    workspace.write_recipe("tiny", merge_recipe(tiny_llama))
    first = workspace.doit("merge")
    assert first.executed == ["fetch:tiny", "merge:tiny"]
    return workspace


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """mount(name, size) -> a fresh tmpfs of that size; remount it with another size by calling again."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        point = tmp_path / name
        if point in mounted:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True)
            return point
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): the full-disk tests need root")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


# ------------------------------------------------------------------------------------------ 1. corruption

def test_verify_quarantines_a_flipped_byte_and_doit_rebuilds_it(merged: Workspace) -> None:
    ws = merged
    path = ws.path / MERGED
    good = blake3_of(path)
    entry = store_file(ws, "merge.tiny", "merged/model.safetensors").parent.parent
    flip_byte(path)                            # a hardlink: the store entry is corrupt too
    result = ws.doit("verify", check=False)
    assert result.returncode != 0 and "Traceback" not in result.output
    lines = mf_lines(result.output)
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and "merge:tiny" in lines[0] and "run doit to rebuild it" in lines[0]
    assert not entry.exists() and (ws.store / "quarantine" / entry.name / "merged" / "model.safetensors").exists()
    assert not (ws.build / "tiny" / "merged").exists() or not any((ws.build / "tiny" / "merged").iterdir())
    again = ws.doit("merge")
    assert again.executed == ["merge:tiny"]
    assert built_counts(ws)["merge:tiny"] == 2
    assert blake3_of(path) == good
    assert os.path.samefile(path, store_file(ws, "merge.tiny", "merged/model.safetensors"))
    clean = ws.doit("verify")
    assert "0 bad" in clean.output


def test_doit_sees_a_write_through_build_by_its_stat_and_rebuilds(merged: Workspace) -> None:
    """No hashing: the store entry's file has another mtime than when it was published, so the entry is
    quarantined in one line and the stage built again."""
    ws = merged
    path = ws.path / MERGED
    good = blake3_of(path)
    entry = store_file(ws, "merge.tiny", "merged/model.safetensors").parent.parent
    flip_byte(path)
    again = ws.doit("merge")
    assert again.executed == ["merge:tiny"] and built_counts(ws)["merge:tiny"] == 2
    lines = [line for line in again.output.splitlines() if line.startswith("mergeforge: ")]
    assert len(lines) == 1 and "merged/model.safetensors was changed after the entry was published" in lines[0]
    assert f"quarantined store entry {entry.name[:12]}" in lines[0], lines
    assert (ws.store / "quarantine" / entry.name).is_dir()
    assert blake3_of(path) == good
    assert "0 bad" in ws.doit("verify", "--full").output


def test_rm_build_and_doit_never_places_a_store_entry_changed_since_publish(merged: Workspace) -> None:
    ws = merged
    path = ws.path / MERGED
    good = blake3_of(path)
    flip_byte(path)                            # through the hardlink: the store entry's bytes
    shutil.rmtree(ws.build)
    again = ws.doit("merge")
    assert again.executed == ["fetch:tiny", "merge:tiny"]
    assert [(e["stage"], e["action"]) for e in ws.events("tiny")] == [("fetch:tiny", "restored"),
                                                                      ("merge:tiny", "built")]
    assert "was changed after the entry was published" in again.output
    assert blake3_of(path) == good
    assert "0 bad" in ws.doit("verify", "--full").output


@pytest.mark.slow
def test_a_stage_never_builds_on_an_input_that_differs_from_its_manifest(
        workspace: Workspace, tiny_llama: Path, llama_cpp: object) -> None:
    """The issue's careful user: a byte flipped in build/<recipe>/merged, then a convert-only edit and `doit
    convert`: the merge is rebuilt first, the convert built on the good bytes, and verify --full finds nothing.
    Run by hand (`python -m steps.convert`, no doit uptodate check) over a copy that differs, the convert checks
    its input, says so in one line and restores the merge before building."""
    ws = workspace
    ws.write_recipe("tiny", merge_recipe(tiny_llama) + "gguf: {outtype: bf16}\n")
    ws.doit("convert")
    path = ws.path / MERGED
    good = blake3_of(path)
    flip_byte(path)
    ws.write_recipe("tiny", merge_recipe(tiny_llama) + "gguf: {outtype: f16}\n")
    again = ws.doit("convert")
    assert again.executed == ["merge:tiny", "convert:tiny"], again.output
    assert built_counts(ws)["merge:tiny"] == 2 and blake3_of(path) == good
    assert "0 bad" in ws.doit("verify", "--full").output

    bad = path.read_bytes()
    path.unlink()
    path.write_bytes(bad[:4096] + bytes([bad[4096] ^ 0xFF]) + bad[4097:])   # another inode: the store is intact
    ws.write_recipe("tiny", merge_recipe(tiny_llama) + "gguf: {outtype: bf16, mtp: drop}\n")
    proc = subprocess.run([sys.executable, "-m", "steps.convert", "tiny"], cwd=ROOT, env=ws.env(),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    lines = [line for line in out.splitlines() if line.startswith("mergeforge: ")]
    assert len(lines) == 1 and f"input {path} differs from its manifest (merge:tiny)" in lines[0], out
    assert "not building on it: restoring it" in lines[0]
    assert blake3_of(path) == good and built_counts(ws)["merge:tiny"] == 2     # restored, not rebuilt
    assert "0 bad" in ws.doit("verify", "--full").output


def test_verify_full_reads_every_byte_for_bit_rot_that_keeps_the_mtime(merged: Workspace) -> None:
    ws = merged
    path = ws.path / MERGED

    def rot() -> None:                         # one byte changes, the mtime does not: the stat cache cannot see it
        before = path.stat()
        flip_byte(path)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

    rot()
    for args, env in ((("verify", "--full"), {}), (("verify",), {"MERGEFORGE_VERIFY_FULL": "1"})):
        proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args], cwd=ws.path,
                              env={**ws.env(), **env}, capture_output=True, text=True, timeout=300)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "Traceback" not in out, out
        assert any(str(path) in line for line in mf_lines(out)), out
        assert "read " in out and "stat-cached" not in out
        assert ws.doit("merge").executed == ["merge:tiny"]    # rebuilt; the next round rots it again
        rot()


def test_verify_is_stat_cached_when_nothing_changed(merged: Workspace) -> None:
    ws = merged
    ws.doit("verify")
    started = time.monotonic()
    result = ws.doit("verify")
    seconds = time.monotonic() - started
    summary = next(line for line in result.output.splitlines() if line.startswith("verify: "))
    print(f"\n{summary}; whole `doit verify` process {seconds:.2f} s")
    assert "0 bad" in summary and "stat-cached" in summary
    assert seconds < 5


def test_a_copied_placement_is_read_only_and_verify_restores_it_from_the_intact_store(
        workspace: Workspace, tiny_llama: Path, tmpfs: Mount) -> None:
    """build/ on another filesystem than the store: placements are copies, so a write through build/ leaves the
    store intact; verify removes the bad copy and the next doit restores it."""
    ws = workspace
    build = tmpfs("build-fs", "64m")
    env = {**ws.env(), "MERGEFORGE_BUILD": str(build)}
    ws.write_recipe("tiny", merge_recipe(tiny_llama))

    def doit(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args], cwd=ws.path,
                              env=env, capture_output=True, text=True, timeout=300)

    assert doit("merge").returncode == 0
    path = build / "tiny" / "merged" / "model.safetensors"
    key = json.loads((build / "tiny" / ".mf" / "merge.tiny.key").read_text())
    assert key["placed"] == "copy"
    assert path.stat().st_mode & 0o777 == 0o444
    good = blake3_of(path)
    flip_byte(path)
    result = doit("verify")
    lines = mf_lines(result.stdout + result.stderr)
    assert result.returncode != 0 and len(lines) == 1 and str(path) in lines[0], lines
    assert "store's copy is intact" in lines[0] and "run doit to restore it" in lines[0]
    assert not path.exists()
    again = doit("merge")
    assert again.returncode == 0 and "merge:tiny restored" in again.stdout + again.stderr
    assert blake3_of(path) == good
    assert doit("verify").returncode == 0


@pytest.fixture
def reflink_fs(tmp_path: Path) -> Iterator[Path]:
    """A small XFS filesystem with reflinks, loop-mounted (needs root and mkfs.xfs: skipped elsewhere)."""
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed (apt-get install xfsprogs): no reflink filesystem to test on")
    image, point = tmp_path / "xfs.img", tmp_path / "xfs"
    with open(image, "wb") as f:
        f.truncate(320 << 20)                  # sparse; XFS's smallest size
    point.mkdir()
    made = subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], capture_output=True, text=True)
    mounted = made.returncode == 0 and subprocess.run(["mount", "-o", "loop", str(image), str(point)],
                                                      capture_output=True).returncode == 0
    if not mounted:
        pytest.skip(f"cannot make and loop-mount an XFS filesystem here: {made.stderr.strip()}")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


def test_on_a_reflink_filesystem_a_write_through_build_leaves_the_store_intact(
        reflink_fs: Path, tiny_llama: Path) -> None:
    ws = Workspace(reflink_fs)
    ws.write_recipe("tiny", merge_recipe(tiny_llama))
    ws.doit("merge")
    assert json.loads((ws.build / "tiny" / ".mf" / "merge.tiny.key").read_text())["placed"] == "reflink"
    path, stored = ws.path / MERGED, store_file(ws, "merge.tiny", "merged/model.safetensors")
    assert not os.path.samefile(path, stored) and path.stat().st_mode & 0o777 == 0o444
    good = blake3_of(stored)
    flip_byte(path)
    assert blake3_of(stored) == good, "the write reached the store"
    result = ws.doit("verify", check=False)
    lines = mf_lines(result.output)
    assert result.returncode != 0 and len(lines) == 1 and "store's copy is intact" in lines[0], result.output
    again = ws.doit("merge")
    assert again.executed == ["merge:tiny"] and ws.events("tiny")[-1]["action"] == "restored"
    assert blake3_of(path) == good
    assert "0 bad" in ws.doit("verify").output


# ------------------------------------------------------------------------- 2, 3. deleted outputs and entries

@pytest.mark.parametrize("rel", ["merged/model.safetensors", "merged/tokenizer.model", "merged/config.json"])
def test_a_deleted_output_file_is_restored_from_the_store(merged: Workspace, rel: str) -> None:
    ws = merged
    path = ws.build / "tiny" / rel
    good = blake3_of(path)
    path.unlink()
    again = ws.doit("merge")
    assert again.executed == ["merge:tiny"]
    assert ws.events("tiny")[-1]["action"] == "restored"
    assert blake3_of(path) == good and os.path.samefile(path, store_file(ws, "merge.tiny", rel))
    assert ws.doit("merge").executed == []


def test_deleted_store_entries_are_rebuilt_and_linked_again(merged: Workspace) -> None:
    ws = merged
    path = ws.path / MERGED
    good = blake3_of(path)
    shutil.rmtree(ws.store / "store")          # build/ still holds the bytes through its hardlinks
    again = ws.doit("merge")
    assert again.executed == ["fetch:tiny", "merge:tiny"]
    assert built_counts(ws) == {"fetch:tiny": 2, "merge:tiny": 2}
    assert blake3_of(path) == good and os.path.samefile(path, store_file(ws, "merge.tiny", "merged/model.safetensors"))
    assert ws.doit("merge").executed == []


# ------------------------------------------------------------------------------------------- 4. concurrency

def _doit_proc(ws: Workspace, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args], cwd=ws.path,
                            env=env or ws.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_doit_n_builds_a_sweeps_stages_in_parallel_each_once(workspace: Workspace, tiny_llama: Path) -> None:
    """`doit -n 3`: three merges of a sweep at once, in three processes; every key built once, and lock.json
    (written by whichever finishes last) lists every stage."""
    ws = workspace
    ws.write_recipe("tiny", merge_recipe(tiny_llama) + "matrix:\n  merge.slices.1.sources.0.layer_range: "
                    "[[1, 4], [2, 4], [0, 4]]\n")
    run = ws.doit("-n", "3", "-P", "process", "merge")
    merges = [f"merge:tiny@layer_range-{r}" for r in ("1-4", "2-4", "0-4")]
    assert sorted(run.executed) == sorted(["fetch:tiny", *merges]), run.output
    events = ws.events("tiny")
    assert sorted(e["stage"] for e in events if e["action"] == "built") == sorted(["fetch:tiny", *merges])
    starts = {e["stage"]: e for e in events}
    lock = json.loads((ws.build / "tiny" / "lock.json").read_text())
    assert set(lock["stages"]) == set(starts)
    assert {f"merged@layer_range-{r}/model.safetensors" for r in ("1-4", "2-4", "0-4")} <= set(lock["artifacts"])
    assert ws.doit("-n", "3", "merge").executed == []
    assert "0 bad" in ws.doit("verify").output


def test_a_second_doit_on_a_locked_build_dir_is_refused_in_one_line(workspace: Workspace, tiny_llama: Path) -> None:
    ws = workspace
    ws.write_recipe("tiny", merge_recipe(tiny_llama))
    ws.build.mkdir(parents=True)
    with open(ws.build / ".lock", "w") as held:     # what a running doit holds
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(f"{os.getpid()}\n")
        held.flush()
        assert_refused(ws, "another doit is building", str(ws.build), f"(pid {os.getpid()})",
                       "wait for it to finish", args=("merge",), max_seconds=5)
        listing = ws.doit("list")              # reading commands do not lock
        assert "merge" in listing.output
    assert ws.doit("merge").executed == ["fetch:tiny", "merge:tiny"]


def test_two_doit_at_once_on_one_checkout_build_each_stage_once(workspace: Workspace, tiny_llama: Path) -> None:
    ws = workspace
    ws.write_recipe("tiny", merge_recipe(tiny_llama))
    procs = [_doit_proc(ws, "merge") for _ in range(2)]
    outs = [(p.wait(timeout=300), p.stdout.read()) for p in procs]  # type: ignore[union-attr]
    for (rc, out), other in zip(outs, reversed(procs), strict=True):
        assert "Traceback" not in out, out
        if rc != 0:                            # the one that came second, if they overlapped
            assert mf_lines(out) == [f"mergeforge: another doit is building {ws.build} (pid {other.pid}); wait "
                                     "for it to finish"], out
    assert any(rc == 0 for rc, _ in outs)
    assert built_counts(ws) == {"fetch:tiny": 1, "merge:tiny": 1}
    assert ws.doit("merge").executed == []
    assert_nothing_half_written(ws)


def test_two_checkouts_sharing_one_store_build_each_stage_once(tmp_path: Path, tiny_llama: Path) -> None:
    one, two = Workspace(tmp_path / "one"), Workspace(tmp_path / "two")
    shared = tmp_path / "shared-store"
    for ws in (one, two):
        ws.write_recipe("tiny", merge_recipe(tiny_llama))
    procs = [_doit_proc(ws, "merge", env={**ws.env(), "MERGEFORGE_STORE": str(shared)}) for ws in (one, two)]
    outs = [(p.wait(timeout=300), p.stdout.read()) for p in procs]  # type: ignore[union-attr]
    for rc, out in outs:
        assert rc == 0 and "Traceback" not in out, out
    assert built_counts(one, two) == {"fetch:tiny": 1, "merge:tiny": 1}
    for ws in (one, two):
        assert {e["stage"] for e in ws.events("tiny")} == {"fetch:tiny", "merge:tiny"}
        assert blake3_of(ws.path / MERGED) == blake3_of(one.path / MERGED)
    assert not any((shared / "tmp").iterdir())


# -------------------------------------------------------------------------------------- 5. killed stages, gc

SLOW_MERGE = textwrap.dedent("""
    import dataclasses, sys, time
    sys.path.insert(0, sys.argv[1])
    import steps.merge
    from steps.plan import find
    from steps.store import execute

    def slow(ctx):
        (ctx.out / "partial.bin").write_bytes(b"x" * 100000)
        time.sleep(600)

    steps.merge.STAGE = dataclasses.replace(steps.merge.STAGE, build=slow)
    execute(find("merge:tiny"))
""")


def test_a_killed_stage_leaves_no_temp_dir_behind(workspace: Workspace, tiny_llama: Path) -> None:
    ws = workspace
    ws.write_recipe("tiny", merge_recipe(tiny_llama))
    ws.doit("fetch")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, str(ROOT)], cwd=ws.path, env=ws.env())
    tmp = ws.store / "tmp"
    deadline = time.time() + 120
    while not list(tmp.glob("merge.*/out/partial.bin")):
        assert time.time() < deadline and proc.poll() is None, "the slow merge never started"
        time.sleep(0.1)
    (work,) = tmp.iterdir()
    assert work.name.split(".")[2] == str(proc.pid), work.name     # <kind>.<key>.<pid>.<random>
    # while its process lives (and holds the key's lock) nobody removes it
    subprocess.run([sys.executable, "-c", "from steps.store import remove_stale_tmp; remove_stale_tmp()"],
                   cwd=ROOT, env=ws.env(), check=True)
    assert work.exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert work.exists()
    again = ws.doit("merge")
    assert again.executed == ["merge:tiny"]
    assert not work.exists() and not any(tmp.iterdir())
    assert_nothing_half_written(ws)


def test_gc_keeps_current_and_recent_entries_and_says_what_it_freed(workspace: Workspace, tiny_llama: Path) -> None:
    ws = workspace
    variants = [((0, 1), (0, 4)), ((0, 2), (1, 4)), ((0, 4),), ((0, 3), (1, 4))]
    keys = []
    for slices in variants:
        ws.write_recipe("tiny", merge_recipe(tiny_llama, slices))
        ws.doit("merge")
        keys.append(json.loads((ws.build / "tiny" / ".mf" / "merge.tiny.key").read_text())["key"])
        time.sleep(0.05)                       # distinct mtimes
    fetch_key = json.loads((ws.build / "tiny" / ".mf" / "fetch.tiny.key").read_text())["key"]
    assert ws.store_entries() == {fetch_key, *keys}
    assert "gc" not in ws.doit("merge").output  # not a default task
    result = ws.doit("gc", "--keep", "1")
    removed = [line for line in result.output.splitlines() if line.startswith("gc: removed merge:tiny entry")]
    assert {line.split()[4] for line in removed} == {k[:12] for k in keys[:2]}, result.output
    assert all(" MB freed)" in line for line in removed), removed
    summary = result.output.strip().splitlines()[-1]
    assert "removed 2 entries" in summary and "freed" in summary, summary
    assert ws.store_entries() == {fetch_key, keys[2], keys[3]}
    assert ws.doit("merge").executed == []     # what the build uses is still there
    env_keep = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "gc"], cwd=ws.path,
                              env={**ws.env(), "MERGEFORGE_GC_KEEP": "0"}, capture_output=True, text=True)
    assert env_keep.returncode == 0, env_keep.stdout + env_keep.stderr
    assert ws.store_entries() == {fetch_key, keys[3]}
    assert not list((ws.store / "locks").glob("*.lock")), "unused lock files are removed too"


# ------------------------------------------------------------------------------------------- 6. disk full

def test_check_space_refuses_in_one_line_naming_path_need_and_free(tmp_path: Path) -> None:
    from steps.store import DiskFull, check_space
    with pytest.raises(DiskFull) as refused:
        check_space(tmp_path, 10**18, "merge:x")
    message = str(refused.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "needs about 1000000.0 TB" in message and " free" in message
    check_space(tmp_path, 1, "merge:x")


def test_merge_estimate_is_close_to_what_the_merge_writes(merged: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in merged.env().items():
        if name.startswith("MERGEFORGE_"):
            monkeypatch.setenv(name, value)
    from steps.plan import plan
    from steps.recipe import load
    from steps.store import estimate_bytes
    stage = next(s for s in plan(load(merged.recipes / "tiny.yaml")) if s.kind == "merge")
    written = sum(p.stat().st_size for p in (merged.build / "tiny" / "merged").iterdir())
    assert 0.8 * written < estimate_bytes(stage, {}) < 1.25 * written


def test_too_little_space_is_refused_before_the_merge_writes(tmpfs: Mount, tiny_llama: Path) -> None:
    """The source is 5.3 MB, the upscaled merge about 7.6 MB: a 4 MB disk is refused up front, in one line; with
    space back, the same command builds."""
    ws = Workspace(tmpfs("disk", "4m"))
    ws.write_recipe("tiny", merge_recipe(tiny_llama))
    line = assert_refused(ws, "merge:tiny", "not enough disk space", str(ws.store / "tmp"), "needs about 7.",
                          "MB free", "doit gc", args=("merge",), max_seconds=30)
    print("\n" + line)
    tmpfs("disk", "32m")
    again = ws.doit("merge")
    assert "merge:tiny" in again.executed and (ws.path / MERGED).exists()
    assert_nothing_half_written(ws)


def test_disk_full_during_the_merge_is_one_line_and_leaves_nothing(tmpfs: Mount, tiny_llama: Path) -> None:
    """float32 output doubles the bytes past the estimate (which assumes the source dtype): the write fails with
    ENOSPC inside the merge; the stage reports it in one line and removes its temporary directory."""
    ws = Workspace(tmpfs("disk", "10m"))
    ws.write_recipe("tiny", merge_recipe(tiny_llama, extra="  out_dtype: float32\n"))
    line = assert_refused(ws, "merge:tiny", "disk full", "free", "doit gc", args=("merge",), max_seconds=30)
    print("\n" + line)
    assert not (ws.build / "tiny" / "merged").exists()
    tmpfs("disk", "64m")
    again = ws.doit("merge")
    assert again.executed == ["merge:tiny"]
    assert (ws.path / MERGED).stat().st_size > 14_000_000        # float32: twice the bf16 merge


def test_a_full_disk_when_doit_saves_its_state_keeps_the_previous_state(tmpfs: Mount, tiny_llama: Path) -> None:
    ws = Workspace(tmpfs("disk", "16m"))
    ws.write_recipe("tiny", merge_recipe(tiny_llama))
    ws.doit("merge")
    state = (ws.build / ".doit.json").read_text()
    filler = ws.path / "filler"
    with open(filler, "wb") as f:              # fill the disk to the last byte
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    (ws.build / "tiny" / "merged" / "tokenizer_config.json").unlink()   # something for this run to do
    full = ws.doit("merge", check=False)
    assert "Traceback" not in full.output, full.output
    lines = mf_lines(full.output)
    assert full.returncode != 0 and len(lines) == 2, full.output
    failed, notice = sorted(lines, key=lambda line: "notice" in line)
    assert "merge:tiny: disk full writing" in failed and "doit gc" in failed, lines
    assert "disk full writing doit's state" in notice and "kept the previous one" in notice, lines
    json.loads((ws.build / ".doit.json").read_text())                    # never left truncated
    assert (ws.build / ".doit.json").read_text() == state
    filler.unlink()
    ws.doit("merge")
    assert (ws.build / "tiny" / "merged" / "tokenizer_config.json").exists()
    assert built_counts(ws) == {"fetch:tiny": 1, "merge:tiny": 1}
    assert ws.doit("merge").executed == []
    assert "0 bad" in ws.doit("verify").output
    assert_nothing_half_written(ws)


def test_a_truncated_state_file_is_moved_aside_and_stages_restore(merged: Workspace) -> None:
    ws = merged
    state = ws.build / ".doit.json"
    text = state.read_text()
    state.write_text(text[: len(text) // 2])   # what an in-place write that died half-way leaves
    again = ws.doit("merge")
    notices = [line for line in mf_lines(again.output) if "notice" in line]
    assert len(notices) == 1 and str(state) in notices[0], again.output
    assert list(ws.build.glob(".doit.json.corrupt-*"))
    assert again.executed == ["fetch:tiny", "merge:tiny"]
    assert built_counts(ws) == {"fetch:tiny": 1, "merge:tiny": 1}      # restored, not rebuilt
    assert ws.doit("merge").executed == []


WRAPPED_DODO = """
import dataclasses, sys
sys.path.insert(0, {root!r})
import steps.merge
import steps.store.executor
{patch}
from dodo import *  # noqa: F401,F403  (the project's tasks and DOIT_CONFIG, with the patch above in force)
"""
SAFETENSORS_WRITER = """
def big_writer(ctx):
    import torch
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(8 << 20, dtype=torch.float32)}, str(ctx.out / "big.safetensors"))   # 32 MB

steps.merge.STAGE = dataclasses.replace(steps.merge.STAGE, build=big_writer)
"""
SPACE_CHECK_PASSED = """
steps.store.executor.check_space = lambda *args, **kwargs: None   # the disk fills after the check passed
"""


def wrapped_doit(ws: Workspace, patch: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    dodo = ws.path / "dodo_patched.py"
    dodo.write_text(WRAPPED_DODO.format(root=str(ROOT), patch=patch))
    proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(dodo), *args], cwd=ws.path,
                          env={**ws.env(), **(env or {})}, capture_output=True, text=True, timeout=300)
    dodo.unlink()
    return proc.returncode, proc.stdout + proc.stderr


def test_disk_full_inside_a_library_writer_is_one_line_naming_the_disk(tmpfs: Mount, tiny_llama: Path) -> None:
    """A stage whose library (here safetensors, as transformers' save_pretrained in a fetch or the heal's save)
    runs out of space raises its own error type: still one line, naming the full filesystem, nothing left."""
    disk = tmpfs("disk", "16m")
    ws = Workspace(disk)
    ws.write_recipe("tiny", merge_recipe(tiny_llama))
    code, out = wrapped_doit(ws, SAFETENSORS_WRITER, "merge")
    assert code != 0 and "Traceback" not in out and "SafetensorError" not in out, out
    (line,) = mf_lines(out)
    print("\n" + line)
    assert "merge:tiny: disk full writing" in line and f"(the filesystem at {disk})" in line, line
    assert "doit gc" in line, line
    assert_nothing_half_written(ws)
    assert not list((ws.store / "tmp").glob("merge.*")), "the temporary directory is left behind"


def test_disk_full_copying_into_a_build_dir_on_another_disk_names_that_disk(tmpfs: Mount, tiny_llama: Path) -> None:
    """The store on one filesystem, build/ on another (placing copies the bytes), and build/'s disk fills after the
    space check: the line names the file in build/ and build/'s filesystem, not the store's file being read."""
    ws = Workspace(tmpfs("store", "64m"))
    build = tmpfs("build", "4m")
    ws.write_recipe("tiny", merge_recipe(tiny_llama))
    code, out = wrapped_doit(ws, SPACE_CHECK_PASSED, "merge", env={"MERGEFORGE_BUILD": str(build)})
    assert code != 0 and "Traceback" not in out, out
    (line,) = mf_lines(out)
    assert "merge:tiny: disk full writing" in line and f"(the filesystem at {build})" in line, line
    print("\n" + line)
    writing = line.split("disk full writing ", 1)[1]
    assert writing.startswith(str(build / "tiny" / "merged" / "model.safetensors") + " "), line
    assert str(ws.store) not in line, line
    assert not [p for p in build.rglob("*.tmp")], "a half-written placement is left in build/"


def test_a_merge_that_cannot_be_made_is_refused_for_that_before_the_space_check(tmpfs: Mount, tiny_llama: Path,
                                                                                tmp_path: Path) -> None:
    """The merge declares its preflight as a late check: models that cannot be stacked are refused for that reason
    (from their headers) even on a disk too small for the merge, and nothing is made in the store's tmp/."""
    from conftest import make_synthetic_llama
    wide = make_synthetic_llama(tmp_path / "wide", layers=4, hidden=128, inter=256, vocab=512)
    ws = Workspace(tmpfs("disk", "4m"))
    ws.write_recipe("tiny", f"sources:\n  a: {{path: {tiny_llama}}}\n  b: {{path: {wide}}}\nmerge:\n"
                    "  merge_method: passthrough\n  base_model: a\n  slices:\n"
                    "    - sources: [{model: a, layer_range: [0, 3]}]\n"
                    "    - sources: [{model: b, layer_range: [1, 4]}]\n")
    line = assert_refused(ws, "merge", "model 'b' has hidden size 128", args=("merge",), max_seconds=30)
    assert "disk space" not in line, line
    assert not list((ws.store / "tmp").glob("merge.*")), "a temporary directory was made"
