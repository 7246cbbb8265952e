"""The sandbox for model-generated code: ``run_code(language, files, argv) -> SandboxResult``.

The capability suite executes code a model wrote; a hostile or broken reply must cost one failed test and nothing
more. Every run gets a fresh working directory holding ``files``, a cleared environment, a wall-clock timeout, a
64 KiB cap (``output_cap``) on each of stdout and stderr (read incrementally; the run is killed the moment a cap
overflows, so 1 GB of output never reaches memory), and resource limits set by a small launcher that execs the
program:

    RLIMIT_AS      memory_mb for Python (python, pytest, sql); memory_mb + 4096 MiB for node, whose V8 reserves
                   address space it never touches (measured here: 0.73 GB virtual for ``node -e 1``, 1.1 GB for a
                   1e6-object script; node does not start with 512 MiB, does with 1 GiB). For node the bound is
                   RLIMIT_DATA = memory_mb + 128 MiB (private writable memory: heap, Buffers, thread stacks) with
                   ``--max-old-space-size=memory_mb``.
                   For ``browser`` (Chromium, whose V8 and allocators reserve terabytes of address space):
                   RLIMIT_DATA = memory_mb, no RLIMIT_AS.
    RLIMIT_CPU     ceil(timeout_s) + 1 s per process (the wall-clock timeout usually fires first)
    RLIMIT_FSIZE   16 MiB per written file;  RLIMIT_CORE 0;  RLIMIT_NOFILE 256
    processes      64 tasks (threads count; 512 for ``browser``: Chromium's processes and playwright's driver),
                   see below; and everything the run started is killed when it ends
                   (and when the caller dies: bwrap --die-with-parent, else PR_SET_PDEATHSIG on the program)

Modes (``sandbox_mode()``; detected once per process and cached; ``MERGEFORGE_SANDBOX=bwrap|rlimits|auto`` forces
one: ``bwrap`` fails loudly when bubblewrap cannot run):

``bwrap`` -- bubblewrap (Debian package ``bubblewrap``), used when ``bwrap`` is on PATH and a probe run succeeds:
  * new mount, pid, network, ipc and uts namespaces (and cgroup when the kernel allows), ``--die-with-parent``,
    ``--new-session`` (no TIOCSTI into a terminal);
  * the filesystem is an empty tmpfs root holding, read-only: /usr (and /bin, /lib*, /sbin as on the host), a few
    /etc files the dynamic loader needs, the Python installation and the project's virtual environment, node's
    installation when it lives outside /usr; plus a fresh /proc and a minimal /dev. Nothing else exists: no home
    directory, no ~/.ssh, no /work, no checkout, no host /tmp;
  * writable: only the working directory ``/sandbox`` (a 64 MiB tmpfs the files are copied into), a private 16 MiB
    /tmp and /dev/shm. They vanish with the run: no write reaches the host's disk;
  * no network: the only interface is the namespace's own loopback (127.0.0.1 there is not the host's);
  * run as root (as in CI containers): bwrap keeps only CAP_SETUID/CAP_SETGID for the launcher, which drops to a
    dedicated unprivileged uid (one per run, 1.6e9 + ...; no such user exists on the host): the program has no
    capabilities and ``PR_SET_NO_NEW_PRIVS`` (setuid binaries in /usr do not elevate), cannot see or signal any
    process outside, and RLIMIT_NPROC counts exactly that run's tasks. Run as another user: bwrap makes a user
    namespace (``--disable-userns`` inside where bwrap >= 0.8), RLIMIT_NPROC counts the tasks of that namespace
    (the tests exercise it only where they do not run as root; checked by hand as uid 65534 with /usr/bin/python3);
  * when the program ends, times out or overflows its output, the namespace's init dies and the kernel kills
    every process left in it.
  Not covered: the kernel itself (namespaces and rlimits are not a VM; a kernel exploit escapes, and as root the
  dedicated uid may still create user namespaces of its own, which widens that surface), CPU time and memory of
  the machine beyond the per-process rlimits (no cgroup memory limit: 64 tasks x memory_mb, plus 96 MiB of tmpfs,
  is the worst case), and reading what is bound read-only (the Python and node installations, the venv's packages).

``rlimits`` -- the fallback where bubblewrap is missing or cannot run (e.g. a container whose seccomp profile
forbids namespaces). It guarantees: the cleared environment, the rlimits above, a fresh working directory (a
temporary directory on the host, also HOME and TMPDIR, removed afterwards), the output caps, the timeout, and the
kill of the run's process group. When the process runs as root it also runs the program as a dedicated
unprivileged uid, *if* that uid can execute the language's interpreter (probed once per language; here the Python
lives under /root, 0700, so Python code stays root and node code drops); otherwise, as root, a pids cgroup (cgroup v1
``/sys/fs/cgroup/pids``) bounds the process count, and without one nothing does (RLIMIT_NPROC does not bind root).
It does NOT guarantee, and the tests check only what it does guarantee:
  * no filesystem isolation: the program sees the whole filesystem with the rights of its user. As a dedicated uid
    it can read whatever is world-readable and write whatever is world-writable (/tmp, /var/tmp, /dev/shm); as
    root, or as the calling user, it can read and write everything that user can: ~/.ssh, the checkout, the store;
  * no process isolation: it sees every process. As root or as the calling user it can read their
    /proc/<pid>/environ (HF_TOKEN included), ptrace them and kill them, the caller included; a dedicated uid
    cannot (they are other users' processes);
  * no network isolation: sockets work (loopback and beyond);
  * a program that leaves its process group (setsid) and is not a dedicated uid can outlive the run: it is bounded
    only by RLIMIT_CPU (a sleeping process, by nothing). Under a dedicated uid, every process of that uid is killed
    after the run; in a pids cgroup, every process of the cgroup;
  * as the calling non-root user, RLIMIT_NPROC is that user's own limit: it is set to the user's current task count
    + 64, shared with everything else the user runs;
  * the disk: RLIMIT_FSIZE bounds each file, not how many it writes before the timeout.

Languages: ``python`` (argv like ``["solution_test.py"]``, run by this project's interpreter; a leading "python",
"python3" or the interpreter's basename is dropped), ``javascript`` (node; a leading "node" dropped), ``sql``
(a runner with Python's sqlite3: argv lists .sql files, executed in order against one in-memory database, or a file
one with ``--db NAME``; each row of each statement that returns rows is printed as one JSON array per line, after
its column names as a JSON array with ``--header``; an error goes to stderr with exit status 1), ``pytest``
(``python -m pytest -p no:cacheprovider <argv>``, plugin autoloading off), ``browser`` (a Python script, run like
``python``, that drives a headless Chromium with playwright: the capability suite's frontend checks. bwrap also binds
/etc/fonts and Debian's /etc/chromium read-only and gives it a 256 MiB /tmp and /dev/shm; Chromium runs with
``--no-sandbox``: this sandbox is its sandbox, and in the rlimits fallback nothing but the rlimits confines it).

``SandboxResult.returncode`` is None when the sandbox stopped the run (timeout, output cap), otherwise the exit
status, negative for a signal (also in bwrap mode, where bwrap reports 128 + N). ``killed`` says why it was
stopped: "timeout", "output cap", "cpu time" (SIGXCPU), "file size" (SIGXFSZ, or a failed run whose stderr says
"File too large" / EFBIG: Python and node ignore SIGXFSZ), "memory" (a failed run whose stderr says MemoryError /
out of memory / allocation failed: the limits make allocations fail rather than kill), else None. ``mode`` and
``elapsed_s`` (wall time, start-up included) come with every result; ``describe(language)`` says what a run gets.

``python -m steps.sandbox`` prints the mode and what it guarantees for each language.
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from steps.errors import MergeforgeError

LANGUAGES = ("python", "javascript", "sql", "pytest", "browser")
MODES = ("bwrap", "rlimits")
OUTPUT_CAP = 64 * 1024            # bytes kept of stdout and of stderr; one byte more kills the run
MAX_PROCS = 64                    # tasks (processes and threads) per run
FILE_SIZE_MB = 16                 # RLIMIT_FSIZE
WORK_TMPFS_MB = 64                # bwrap: the working directory's size
TMP_TMPFS_MB = 16                 # bwrap: /tmp and /dev/shm
NOFILE = 256
NODE_VM_HEADROOM_MB = 4096        # node's address-space reservations on top of memory_mb
NODE_DATA_HEADROOM_MB = 128
BROWSER_PROCS = 512               # browser: Chromium's processes and threads, and playwright's node driver
BROWSER_TMPFS_MB = 256            # browser: /tmp (its profile) and /dev/shm (its shared memory)
UID_BASE = 1_600_000_000          # dedicated uids: UID_BASE + (pid << 8 | run counter), no user of the host
WORKDIR = "/sandbox"              # the working directory inside bwrap
ENV_MODE = "MERGEFORGE_SANDBOX"
_PREFIX = "mergeforge-sandbox-"
_MEMORY_RE = re.compile(r"MemoryError|out of memory|Cannot allocate memory|allocation failed|bad_alloc", re.I)
_FSIZE_RE = re.compile(r"File too large|EFBIG")
_ETC = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives",
        "/etc/ssl/openssl.cnf")     # node reads OpenSSL's configuration at start-up
_BROWSER_ETC = ("/etc/fonts", "/etc/chromium", "/etc/chromium.d")   # fontconfig; Debian's Chromium settings
_counter = itertools.count()


class SandboxUnavailable(MergeforgeError):
    """MERGEFORGE_SANDBOX asks for a mode this machine cannot provide."""


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    killed: str | None        # why the sandbox stopped it (timeout, output cap, memory, cpu time, file size) or None
    mode: str = ""            # "bwrap" or "rlimits"
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed is None


@dataclass(frozen=True)
class Confinement:
    """What a run of one language gets in one mode (``describe()``)."""
    mode: str
    user: str                    # "dedicated uid", "root" or "calling user"
    process_limit: str | None    # the mechanism bounding the task count, None when nothing does
    filesystem_isolated: bool    # only the working directory (and a private /tmp) writable, home and checkout unseen
    network_isolated: bool


# The launcher: sets the limits, joins the cgroup, drops to the dedicated uid, execs the program.
_LAUNCHER = r"""
import ctypes, json, os, resource, sys
spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
for name, soft, hard in spec["rlimits"]:
    resource.setrlimit(getattr(resource, name), (soft, hard))
if spec["cgroup"]:
    with open(spec["cgroup"], "w") as f:
        f.write(str(os.getpid()))
uid = spec["uid"]
if uid is not None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
libc.prctl(38, 1, 0, 0, 0)     # PR_SET_NO_NEW_PRIVS
libc.prctl(1, 9, 0, 0, 0)      # PR_SET_PDEATHSIG SIGKILL (after setresuid, which clears it)
os.umask(0o022)
argv = spec["argv"]
try:
    os.execv(argv[0], argv)
except OSError as e:
    sys.stderr.write("sandbox: cannot run %s: %s\n" % (argv[0], e))
    os._exit(127)
"""

_SQL_RUNNER = r"""
import json, sqlite3, sys
args, db, header = sys.argv[1:], ":memory:", False
paths = []
while args:
    a = args.pop(0)
    if a == "--db":
        db = args.pop(0)
    elif a == "--header":
        header = True
    else:
        paths.append(a)
con = sqlite3.connect(db, isolation_level=None)
def run(sql):
    cur = con.execute(sql)
    if cur.description is not None:
        if header:
            print(json.dumps([d[0] for d in cur.description]))
        for row in cur:
            print(json.dumps(list(row), default=lambda v: v.hex() if isinstance(v, bytes) else str(v)))
try:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        buf = ""
        for ch in text:
            buf += ch
            if ch == ";" and sqlite3.complete_statement(buf):
                if buf.strip(" \t\r\n;"):
                    run(buf)
                buf = ""
        if buf.strip():
            run(buf)
except sqlite3.Error as e:
    sys.stderr.write("sql error: %s: %s\n" % (type(e).__name__, e))
    sys.exit(1)
"""


# ---------------------------------------------------------------------------------------------------------- modes

@functools.cache
def _bwrap_probe() -> str | None:
    """None when bubblewrap runs this project's Python in the full configuration, else why not."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed (apt-get install bubblewrap)"
    try:
        result = _run("bwrap", "python", {}, ["-c", "print('ok')"], timeout_s=30, memory_mb=512, stdin="")
    except OSError as e:
        return f"bwrap cannot start: {e}"
    if result.returncode == 0 and result.stdout.strip() == "ok":
        return None
    return f"bwrap fails here (exit {result.returncode}): {result.stderr.strip()[-300:]}"


def available_modes() -> list[str]:
    """The modes this machine can run (the fallback always)."""
    return (["bwrap"] if _bwrap_probe() is None else []) + ["rlimits"]


@functools.cache
def sandbox_mode() -> str:
    """The mode run_code uses: bubblewrap where it works, else the rlimits fallback (MERGEFORGE_SANDBOX forces)."""
    _sweep_stale()
    wanted = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if wanted not in ("auto", *MODES):
        raise SandboxUnavailable(f"{ENV_MODE}={wanted!r}: expected auto, bwrap or rlimits")
    if wanted == "rlimits":
        return "rlimits"
    why = _bwrap_probe()
    if why is None:
        return "bwrap"
    if wanted == "bwrap":
        raise SandboxUnavailable(f"{ENV_MODE}=bwrap but {why}")
    print(f"mergeforge: sandbox: {why}; generated code runs in the rlimits fallback (no filesystem or network "
          "isolation, see steps/sandbox.py)", file=sys.stderr)
    return "rlimits"


def _is_root() -> bool:
    return os.geteuid() == 0


@functools.cache
def _uid_can_run(language: str) -> bool:
    """Whether an unprivileged dedicated uid can execute the language's interpreter (rlimits mode, as root)."""
    smoke = {"python": [sys.executable, "-c", "import sqlite3"],
             "sql": [sys.executable, "-c", "import sqlite3"],
             "pytest": [sys.executable, "-m", "pytest", "--version"],
             "javascript": [_node(), "-e", "0"],
             "browser": [sys.executable, "-c", "import playwright"]}[language]
    if smoke[0] is None:
        return False
    spec = {"rlimits": [], "cgroup": None, "uid": UID_BASE - 1, "argv": smoke}
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(spec)], cwd="/",
                              env=_env(language, "/", "/"), stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


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


def describe(language: str = "python", mode: str | None = None) -> Confinement:
    """What a run of ``language`` gets in ``mode`` (default: sandbox_mode())."""
    _check_language(language)
    mode = mode or sandbox_mode()
    if mode == "bwrap":
        if _is_root():
            return Confinement("bwrap", "dedicated uid", "RLIMIT_NPROC (dedicated uid)", True, True)
        return Confinement("bwrap", "calling user", "RLIMIT_NPROC (user namespace)", True, True)
    if not _is_root():
        return Confinement("rlimits", "calling user", "RLIMIT_NPROC (shared with the user's tasks)", False, False)
    if _uid_can_run(language):
        return Confinement("rlimits", "dedicated uid", "RLIMIT_NPROC (dedicated uid)", False, False)
    if _pids_cgroup_base() is not None:
        return Confinement("rlimits", "root", "cgroup pids.max", False, False)
    return Confinement("rlimits", "root", None, False, False)


# ------------------------------------------------------------------------------------------------------- commands

@functools.cache
def _node() -> str | None:
    found = shutil.which("node") or shutil.which("nodejs")
    return os.path.realpath(found) if found else None


def _check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; known: {', '.join(LANGUAGES)}")


def _strip(argv: list[str], names: set[str]) -> list[str]:
    return argv[1:] if argv and os.path.basename(argv[0]) in names else argv


def _command(language: str, argv: list[str], memory_mb: int) -> list[str]:
    py = sys.executable
    pynames = {"python", "python3", os.path.basename(py), f"python{sys.version_info[0]}.{sys.version_info[1]}"}
    if language in ("python", "browser"):
        return [py, *_strip(list(argv), pynames)]
    if language == "pytest":
        rest = _strip(list(argv), pynames)
        if rest[:2] == ["-m", "pytest"]:
            rest = rest[2:]
        rest = _strip(rest, {"pytest", "py.test"})
        return [py, "-m", "pytest", "-p", "no:cacheprovider", *rest]
    if language == "sql":
        rest = _strip(_strip(list(argv), pynames), {"sqlite3"})
        return [py, "-c", _SQL_RUNNER, *rest]
    node = _node()
    if node is None:
        raise FileNotFoundError("node is not installed: javascript cannot run")
    return [node, f"--max-old-space-size={memory_mb}", *_strip(list(argv), {"node", "nodejs"})]


def _max_procs(language: str) -> int:
    return BROWSER_PROCS if language == "browser" else MAX_PROCS


def _rlimits(language: str, timeout_s: float, memory_mb: int, nproc: int) -> list[tuple[str, int, int]]:
    mib = 1024 * 1024
    cpu = math.ceil(timeout_s) + 1
    limits = [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_FSIZE", FILE_SIZE_MB * mib, FILE_SIZE_MB * mib),
              ("RLIMIT_CORE", 0, 0), ("RLIMIT_NOFILE", NOFILE, NOFILE), ("RLIMIT_NPROC", nproc, nproc)]
    if language == "browser":    # Chromium and V8 reserve terabytes of address space: bound what they write
        limits += [("RLIMIT_DATA", memory_mb * mib, memory_mb * mib)]
    elif language == "javascript":
        limits += [("RLIMIT_AS", (memory_mb + NODE_VM_HEADROOM_MB) * mib, (memory_mb + NODE_VM_HEADROOM_MB) * mib),
                   ("RLIMIT_DATA", (memory_mb + NODE_DATA_HEADROOM_MB) * mib,
                    (memory_mb + NODE_DATA_HEADROOM_MB) * mib)]
    else:
        limits.append(("RLIMIT_AS", memory_mb * mib, memory_mb * mib))
    return limits


def _env(language: str, home: str, tmp: str) -> dict[str, str]:
    path = [os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]
    env = {"PATH": ":".join(dict.fromkeys(path)), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home,
           "TMPDIR": tmp, "USER": "sandbox", "LOGNAME": "sandbox"}
    if language in ("python", "pytest", "sql", "browser"):
        env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONHASHSEED="0", PYTHONUTF8="1", PYTHONNOUSERSITE="1")
    if language == "pytest":
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return env


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


def _check_files(files: dict[str, str]) -> list[tuple[str, bytes]]:
    out = []
    for name, content in files.items():
        parts = name.split("/")
        if (not name or "\0" in name or name.startswith("/") or any(p in ("", ".", "..") for p in parts)
                or len(name) > 255):
            raise ValueError(f"sandbox file name {name!r} is not a plain relative path")
        out.append((name, content.encode("utf-8") if isinstance(content, str) else bytes(content)))
    return out


# ----------------------------------------------------------------------------------------------------------- bwrap

def _ro_roots(language: str) -> list[str]:
    """Host directories the language's interpreter needs, outside /usr, bound read-only."""
    roots: list[str] = []
    if language == "javascript":
        node = _node()
        if node:
            roots.append(os.path.dirname(os.path.dirname(node)))
    # The launcher and the sql runner are Python: its installation is always bound.
    for p in (sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))):
        roots.append(os.path.realpath(p))
        roots.append(os.path.abspath(p))
    out: list[str] = []
    for r in sorted(set(roots), key=len):
        if r in ("/", "/usr") or r.startswith("/usr/") or any(r == o or r.startswith(o + "/") for o in out):
            continue
        if os.path.isdir(r):
            out.append(r)
    return out


@functools.cache
def _bwrap_help() -> str:
    try:
        done = subprocess.run(["bwrap", "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout + done.stderr


def _tmpfs(path: str, perms: str, size_mb: int) -> list[str]:
    size = ["--size", str(size_mb << 20)] if "--size" in _bwrap_help() else []     # bwrap >= 0.6
    return ["--perms", perms, *size, "--tmpfs", path]


def _bwrap_args(language: str, root: bool) -> list[str]:
    args = ["bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
    if root:
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user"] + (["--disable-userns"] if "--disable-userns" in _bwrap_help() else [])
    args += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--perms", "0755", "--dir", "/etc", "--perms", "0755", "--dir", "/etc/ssl"]
    for path in _ETC + (_BROWSER_ETC if language == "browser" else ()):
        args += ["--ro-bind-try", path, path]
    # the private /tmp first: a root below /tmp (a checkout or venv there) is then bound on top of it, not hidden
    tmp_mb = BROWSER_TMPFS_MB if language == "browser" else TMP_TMPFS_MB
    args += _tmpfs("/tmp", "1777", tmp_mb)
    made: set[str] = {"/", "/tmp"}
    for r in _ro_roots(language):
        parent = os.path.dirname(r)
        chain = []
        while parent not in made:
            chain.append(parent)
            parent = os.path.dirname(parent)
        for d in reversed(chain):
            args += ["--perms", "0755", "--dir", d]
            made.add(d)
        args += ["--ro-bind", r, r]
        made.add(r)
    args += ["--proc", "/proc", "--dev", "/dev", *_tmpfs("/dev/shm", "1777", tmp_mb),
             *_tmpfs(WORKDIR, "0777", WORK_TMPFS_MB)]
    return args


# ------------------------------------------------------------------------------------------------------- running

def run_code(language: str, files: dict[str, str], argv: list[str], *, timeout_s: float = 10, memory_mb: int = 512,
             stdin: str = "", mode: str | None = None, output_cap: int = OUTPUT_CAP) -> SandboxResult:
    """Run model-written code in the sandbox and return what it printed, capped, and how it ended.

    ``files`` (relative path -> text) are written into a fresh working directory, the program's cwd and its only
    writable place; ``argv`` is the command after the interpreter (see the module docstring). ``mode`` overrides
    sandbox_mode() (tests use it to exercise both); ``output_cap`` replaces OUTPUT_CAP (a browser check returns its
    screenshot on stdout)."""
    _check_language(language)
    _sweep_stale()
    mode = mode or sandbox_mode()
    if mode not in MODES:
        raise ValueError(f"unknown sandbox mode {mode!r}; known: {', '.join(MODES)}")
    if mode == "bwrap" and _bwrap_probe() is not None:
        raise SandboxUnavailable(f"sandbox mode bwrap: {_bwrap_probe()}")
    return _run(mode, language, files, argv, timeout_s=timeout_s, memory_mb=memory_mb, stdin=stdin,
                output_cap=output_cap)


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


def main() -> None:
    mode = sandbox_mode()
    print(f"mode: {mode}" + ("" if _bwrap_probe() is None else f" (bwrap: {_bwrap_probe()})"))
    for language in LANGUAGES:
        if language == "javascript" and _node() is None:
            print(f"  {language}: node not installed")
            continue
        print(f"  {language}: {describe(language, mode)}")


if __name__ == "__main__":
    main()
