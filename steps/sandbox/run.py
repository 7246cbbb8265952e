"""One run in a given mode (``_run``; the public ``run_code``, which picks the mode, is in the package
``__init__``): the working directory and its files, the launch, reading the capped output until the deadline,
the kill of everything the run started, and why it was stopped."""
from __future__ import annotations

import itertools
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from steps.sandbox.bwrap import _bwrap_args
from steps.sandbox.launch import _LAUNCHER, _check_files, _command, _env, _max_procs, _rlimits, _uid_can_run
from steps.sandbox.limits import _PREFIX, OUTPUT_CAP, UID_BASE, WORKDIR
from steps.sandbox.procs import _empty_cgroup, _Info, _is_root, _kill_all, _pids_cgroup_base, _rmtree, _user_tasks
from steps.sandbox.results import SandboxResult

_MEMORY_RE = re.compile(r"MemoryError|out of memory|Cannot allocate memory|allocation failed|bad_alloc", re.I)
_FSIZE_RE = re.compile(r"File too large|EFBIG")
_counter = itertools.count()


def _run(mode: str, language: str, files: dict[str, str], argv: list[str], *, timeout_s: float, memory_mb: int,
         stdin: str, output_cap: int = OUTPUT_CAP) -> SandboxResult:
    checked = _check_files(files)
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError("timeout_s and memory_mb must be positive")
    command = _command(language, argv, memory_mb)
    root = _is_root()
    uid = UID_BASE + ((os.getpid() & 0xFFFFF) << 8 | next(_counter) & 0xFF)
    start = time.monotonic()
    stdin_file = tempfile.TemporaryFile()
    stdin_file.write(stdin.encode("utf-8"))
    stdin_file.seek(0)
    workdir: str | None = None
    cgroup: Path | None = None
    fds: list[int] = []
    info = _Info()
    run_uid: int | None = None
    try:
        if mode == "bwrap":
            run_uid = uid if root else None
            nproc = _max_procs(language)
            prefix = _bwrap_args(language, root)
            made = {WORKDIR}
            for name, data in checked:
                parts = name.split("/")
                for i in range(1, len(parts)):
                    d = WORKDIR + "/" + "/".join(parts[:i])
                    if d not in made:
                        prefix += ["--perms", "0777", "--dir", d]
                        made.add(d)
                fd = os.memfd_create("sandbox-file")
                _write_all(fd, data)
                os.lseek(fd, 0, os.SEEK_SET)
                fds.append(fd)
                prefix += ["--perms", "0666", "--file", str(fd), f"{WORKDIR}/{name}"]
            info.read_fd, write_fd = os.pipe()
            fds.append(write_fd)
            prefix += ["--info-fd", str(write_fd), "--chdir", WORKDIR, "--"]
            cwd, env = "/", _env(language, WORKDIR, "/tmp")
        else:
            workdir = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
            for name, data in checked:
                target = Path(workdir, name)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            nproc = _max_procs(language)
            if root and _uid_can_run(language):
                run_uid = uid
                for dirpath, dirnames, filenames in os.walk(workdir):
                    for n in [dirpath, *(os.path.join(dirpath, f) for f in dirnames + filenames)]:
                        os.lchown(n, uid, uid)
            elif root:
                base = _pids_cgroup_base()
                if base is not None:
                    cgroup = base / f"{os.getpid()}-{uid & 0xFF}-{time.monotonic_ns()}"
                    cgroup.mkdir()
                    (cgroup / "pids.max").write_text(str(_max_procs(language)))
            else:
                nproc = _user_tasks() + _max_procs(language)
            prefix = []
            cwd, env = workdir, _env(language, workdir, workdir)
        spec = {"rlimits": _rlimits(language, timeout_s, memory_mb, nproc),
                "cgroup": str(cgroup / "cgroup.procs") if cgroup else None, "uid": run_uid, "argv": command}
        full = [*prefix, sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(spec)]
        proc = subprocess.Popen(full, cwd=cwd, env=env, stdin=stdin_file, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True, pass_fds=fds)
        for fd in fds:
            os.close(fd)
        fds = []
        try:
            out, err, timed_out, overflow = _collect(proc, start + timeout_s,
                                                     lambda: _kill_all(proc, mode, run_uid, cgroup, info), output_cap)
        finally:
            _kill_all(proc, mode, run_uid, cgroup, info)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            proc.stdout.close()
            proc.stderr.close()
        rc = proc.returncode
        if mode == "bwrap" and rc is not None and 128 < rc < 128 + 65:
            rc = -(rc - 128)
        stderr = err.decode("utf-8", "replace")
        killed: str | None = None
        if overflow:
            killed = "output cap"
        elif timed_out:
            killed = "timeout"
        elif rc == -signal.SIGXCPU:
            killed = "cpu time"
        elif rc == -signal.SIGXFSZ or (rc != 0 and _FSIZE_RE.search(stderr[-4096:])):
            killed = "file size"        # Python and node ignore SIGXFSZ: their write fails with EFBIG instead
        elif rc != 0 and _MEMORY_RE.search(stderr[-4096:]):
            killed = "memory"
        return SandboxResult(None if (overflow or timed_out) else rc, out.decode("utf-8", "replace"), stderr,
                             timed_out, killed, mode, round(time.monotonic() - start, 4))
    finally:
        for fd in fds:
            os.close(fd)
        if info.read_fd is not None:
            os.close(info.read_fd)
        stdin_file.close()
        if cgroup is not None:
            _empty_cgroup(cgroup)
        if workdir is not None:
            _rmtree(workdir)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _collect(proc: subprocess.Popen, deadline: float, kill, cap: int = OUTPUT_CAP) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout and stderr as they come, up to ``cap`` bytes each; stop at the deadline or on overflow."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for f in bufs:
        os.set_blocking(f.fileno(), False)
        sel.register(f, selectors.EVENT_READ)
    timed_out = overflow = False
    exited_at: float | None = None
    try:
        while sel.get_map() and not overflow:
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
                kill()                      # whatever it left behind; its pipes then close
            if exited_at is not None and now - exited_at > 1.0:
                break                       # an escaped process (fallback mode) still holds a pipe
            if now >= deadline:
                timed_out = exited_at is None
                break
            for key, _ in sel.select(min(deadline - now, 0.1)):
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.fileobj]
                room = cap - len(buf)
                buf += chunk[:room]
                if len(chunk) > room:
                    overflow = True
                    break
    finally:
        sel.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), timed_out, overflow
