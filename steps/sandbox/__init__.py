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

Modes (``sandbox_mode()``; detected once per process and cached; ``MERGEFORGE_SANDBOX=bwrap|rlimits|auto``, or a
recipe's ``eval.sandbox``, asks for one: ``bwrap`` fails loudly when bubblewrap cannot run; ``auto``, the default,
is bwrap where it works and otherwise *none*: generated code is not run, and the eval reports those tests as "not
run", so no score hides how it was obtained; the rlimits fallback runs only when asked for by name):

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

``rlimits`` -- the fallback, asked for by name, where bubblewrap is missing or cannot run (e.g. a container whose
seccomp profile forbids namespaces). It guarantees: the cleared environment, the rlimits above, a fresh working
directory (a temporary directory on the host, also HOME and TMPDIR, removed afterwards), the output caps, the
timeout, and the kill of the run's process group. When the process runs as root it also runs the program as a
dedicated unprivileged uid, *if* that uid can execute the language's interpreter (probed once per language; here the
Python lives under /root, 0700, so Python code stays root and node code drops); otherwise, as root, a pids cgroup
(cgroup v1 ``/sys/fs/cgroup/pids``) bounds the process count, and without one nothing does (RLIMIT_NPROC does not
bind root).
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

import contextlib
import functools
import shutil
import sys
from collections.abc import Iterator

# The package's parts, bottom to top: limits, results, launch, procs, bwrap, run. This file picks the mode; run_code
# stays here with sandbox_mode, which it reads from this module (a patch of steps.sandbox.sandbox_mode holds).
from steps import settings
from steps.sandbox.bwrap import _bwrap_args as _bwrap_args      # re-exported: the tests call it
from steps.sandbox.launch import _check_language, _node, _uid_can_run
from steps.sandbox.limits import (BROWSER_PROCS, BROWSER_TMPFS_MB, ENV_MODE, FILE_SIZE_MB, LANGUAGES, MAX_PROCS,
                                  MODES, NODE_DATA_HEADROOM_MB, NODE_VM_HEADROOM_MB, NOFILE, OUTPUT_CAP,
                                  TMP_TMPFS_MB, UID_BASE, WORK_TMPFS_MB, WORKDIR)
from steps.sandbox.procs import _is_root, _pids_cgroup_base, _sweep_stale, live_processes
from steps.sandbox.results import Confinement, SandboxResult, SandboxUnavailable
from steps.sandbox.run import _run

__all__ = ["BROWSER_PROCS", "BROWSER_TMPFS_MB", "ENV_MODE", "FILE_SIZE_MB", "LANGUAGES", "MAX_PROCS", "MODES",
           "NODE_DATA_HEADROOM_MB", "NODE_VM_HEADROOM_MB", "NOFILE", "OUTPUT_CAP", "TMP_TMPFS_MB", "UID_BASE",
           "WORK_TMPFS_MB", "WORKDIR", "Confinement", "SandboxResult", "SandboxUnavailable", "available_modes",
           "NO_SANDBOX", "choose", "describe", "live_processes", "main", "resolve", "run_code",
           "sandbox_mode"]


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


NO_SANDBOX = ("install bubblewrap (apt-get install bubblewrap), or opt in to the fallback without filesystem and "
              "network isolation: MERGEFORGE_SANDBOX=rlimits or the recipe's eval.sandbox: rlimits")
_wanted = "auto"                 # the eval's choice (eval.sandbox); MERGEFORGE_SANDBOX overrides it


def sandbox_mode() -> str:
    """The mode run_code uses: bubblewrap where it works; the rlimits fallback only when asked for
    (``MERGEFORGE_SANDBOX=rlimits``, or ``choose("rlimits")`` from the recipe); else "none": generated code is
    not run at all (run_code raises SandboxUnavailable, and the eval reports those tests as not run)."""
    _sweep_stale()
    env = settings.sandbox_mode()
    return resolve(_wanted if env == "auto" else env)


@functools.cache
def resolve(wanted: str) -> str:
    """``wanted`` (auto | bwrap | rlimits) on this machine: bwrap, rlimits or none."""
    if wanted not in ("auto", *MODES):
        raise SandboxUnavailable(f"{ENV_MODE}={wanted!r}: expected auto, bwrap or rlimits")
    if wanted == "rlimits":
        return "rlimits"
    why = _bwrap_probe()
    if why is None:
        return "bwrap"
    if wanted == "bwrap":
        raise SandboxUnavailable(f"{ENV_MODE}=bwrap but {why}")
    print(f"mergeforge: sandbox: {why}; generated code is not run: {NO_SANDBOX}", file=sys.stderr)
    return "none"


@contextlib.contextmanager
def choose(wanted: str) -> Iterator[str]:
    """Run the block with ``wanted`` (a recipe's eval.sandbox) as the mode asked for; yields sandbox_mode()."""
    global _wanted
    before, _wanted = _wanted, wanted
    try:
        yield sandbox_mode()
    finally:
        _wanted = before


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
    if mode == "none":
        raise SandboxUnavailable(f"no sandbox for generated code: {_bwrap_probe()}; {NO_SANDBOX}")
    if mode not in MODES:
        raise ValueError(f"unknown sandbox mode {mode!r}; known: {', '.join(MODES)}")
    if mode == "bwrap" and _bwrap_probe() is not None:
        raise SandboxUnavailable(f"sandbox mode bwrap: {_bwrap_probe()}")
    return _run(mode, language, files, argv, timeout_s=timeout_s, memory_mb=memory_mb, stdin=stdin,
                output_cap=output_cap)


def main() -> None:
    mode = sandbox_mode()
    if mode == "none":
        print(f"mode: none: generated code is not run ({_bwrap_probe()}); {NO_SANDBOX}")
        return
    print(f"mode: {mode}" + ("" if _bwrap_probe() is None else f" (bwrap: {_bwrap_probe()})"))
    for language in LANGUAGES:
        if language == "javascript" and _node() is None:
            print(f"  {language}: node not installed")
            continue
        print(f"  {language}: {describe(language, mode)}")
