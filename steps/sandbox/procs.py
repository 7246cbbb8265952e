"""The processes and leftovers of runs: who we run as, the calling user's task count, the pids cgroup, killing
everything a run started (bwrap's init, the process group, a dedicated uid's processes, a cgroup's tasks), and
sweeping the working directories and cgroups of callers that were killed mid-run."""
from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from steps.sandbox.limits import _PREFIX


def _is_root() -> bool:
    return os.geteuid() == 0


def _user_tasks() -> int:
    """The calling user's tasks (processes and threads): what RLIMIT_NPROC counts."""
    uid, total = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            total += int(fields.get("Threads", "1"))
    return total


@functools.cache
def _pids_cgroup_base() -> Path | None:
    """A directory in the cgroup v1 pids hierarchy where per-run cgroups can be made (root only)."""
    if not _is_root():
        return None
    root = Path("/sys/fs/cgroup/pids")
    try:
        if not (root / "cgroup.procs").is_file():
            return None
        base = root / "mergeforge-sandbox"
        base.mkdir(exist_ok=True)
        probe = base / f"probe-{os.getpid()}"
        probe.mkdir(exist_ok=True)
        ok = (probe / "pids.max").is_file()
        probe.rmdir()
        return base if ok else None
    except OSError:
        return None


class _Info:
    """bwrap's --info-fd: the pid (in our namespace) of the sandbox's init, pid 1 of its pid namespace."""
    def __init__(self) -> None:
        self.read_fd: int | None = None
        self.data = b""

    def init_pid(self) -> int | None:
        if self.read_fd is not None:
            os.set_blocking(self.read_fd, False)
            try:
                while chunk := os.read(self.read_fd, 4096):
                    self.data += chunk
            except BlockingIOError:
                pass
        found = re.search(rb'"child-pid"\s*:\s*(\d+)', self.data)
        return int(found.group(1)) if found else None


def _kill_bwrap_init(proc: subprocess.Popen, info: _Info) -> None:
    """SIGKILL the sandbox's init (a child of the bwrap we started), then wait for that bwrap: the kernel kills every
    process of the pid namespace and reaps them all before the init's exit completes, so once bwrap has exited,
    nothing the run started is left."""
    pid = info.init_pid()
    if pid is None or proc.poll() is not None:
        return
    try:
        pidfd = os.pidfd_open(pid)      # a handle on that very process: a reused pid cannot be hit
    except OSError:
        return
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if int(stat.rsplit(")", 1)[1].split()[1]) == proc.pid:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        pass
    finally:
        os.close(pidfd)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _kill_all(proc: subprocess.Popen, mode: str, uid: int | None, cgroup: Path | None, info: _Info) -> None:
    """Kill everything the run started: bwrap, the sandbox's init (and with it the whole pid namespace); the run's
    process group; every process of its dedicated uid (rlimits mode); every process of its cgroup."""
    if mode == "bwrap":
        _kill_bwrap_init(proc, info)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if mode == "rlimits" and uid is not None:
        _kill_uid(uid)
    if cgroup is not None:
        _empty_cgroup(cgroup, remove=False)


def _live_tasks(uid: int) -> list[int]:
    """Processes of ``uid`` that are not zombies (a zombie is dead: pid 1 reaps it when it gets to it)."""
    return live_processes(lambda found: found == uid)


def live_processes(uid_matches: Callable[[int], bool]) -> list[int]:
    """The pids of live (non-zombie) processes whose real uid ``uid_matches``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                status = Path(entry.path, "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            uid = fields.get("Uid", "").split()[:1]
            if uid and uid_matches(int(uid[0])) and not fields.get("State", "").strip().startswith("Z"):
                found.append(int(entry.name))
    return found


def _kill_uid(uid: int) -> None:
    """Kill every process of a dedicated uid: kill(-1) as that uid signals exactly its processes; then whatever a
    scan of /proc still finds alive (one may have been forking), through a pidfd checked to be that uid's."""
    if not _live_tasks(uid):
        return
    killer = (f"import os\nos.setgroups([]); os.setresgid({uid}, {uid}, {uid}); os.setresuid({uid}, {uid}, {uid})\n"
              "try:\n    os.kill(-1, 9)\nexcept ProcessLookupError:\n    pass\n")
    subprocess.run([sys.executable, "-I", "-S", "-c", killer], env={}, cwd="/", stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=30)
    for _ in range(100):
        pids = _live_tasks(uid)
        if not pids:
            return
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if f"\nUid:\t{uid}\t" in Path(f"/proc/{pid}/status").read_text():
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(pidfd)
        time.sleep(0.01)


def _empty_cgroup(cgroup: Path, remove: bool = True) -> None:
    for _ in range(1000):
        try:
            pids = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    if remove:
        for _ in range(200):
            try:
                cgroup.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)        # the killed tasks are still exiting


def _rmtree(path: str) -> None:
    def fix(func, p, exc):              # a directory the program made unwritable (non-root)
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=fix)
    else:
        shutil.rmtree(path, onerror=fix)
    shutil.rmtree(path, ignore_errors=True)


@functools.cache
def _sweep_stale() -> None:
    """Remove working directories and cgroups left by processes that were killed (kill -9) mid-run."""
    def dead(pid: str) -> bool:
        return pid.isdigit() and not os.path.exists(f"/proc/{pid}")
    try:
        for entry in os.scandir(tempfile.gettempdir()):
            if entry.name.startswith(_PREFIX) and dead(entry.name[len(_PREFIX):].split("-")[0]):
                _rmtree(entry.path)
    except OSError:
        pass
    base = _pids_cgroup_base()
    if base is not None:
        for entry in os.scandir(base):
            if entry.is_dir() and dead(entry.name.split("-")[0]):
                _empty_cgroup(Path(entry.path))
