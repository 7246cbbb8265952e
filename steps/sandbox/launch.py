"""What a run executes, in both modes: the launcher script that sets the rlimits, joins the cgroup, drops to the
dedicated uid and execs the program; the SQL runner; the command line, rlimits and cleared environment of each
language; the checked file names; and whether a dedicated uid can run a language at all."""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys

from steps.sandbox.limits import (BROWSER_PROCS, FILE_SIZE_MB, LANGUAGES, MAX_PROCS, NODE_DATA_HEADROOM_MB,
                                  NODE_VM_HEADROOM_MB, NOFILE, UID_BASE)

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


def _check_files(files: dict[str, str]) -> list[tuple[str, bytes]]:
    out = []
    for name, content in files.items():
        parts = name.split("/")
        if (not name or "\0" in name or name.startswith("/") or any(p in ("", ".", "..") for p in parts)
                or len(name) > 255):
            raise ValueError(f"sandbox file name {name!r} is not a plain relative path")
        out.append((name, content.encode("utf-8") if isinstance(content, str) else bytes(content)))
    return out


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
