"""The bubblewrap command line: namespaces, the read-only roots the interpreters need, the private tmpfs
mounts."""
from __future__ import annotations

import functools
import os
import subprocess
import sys

from steps.sandbox.launch import _node
from steps.sandbox.limits import BROWSER_TMPFS_MB, TMP_TMPFS_MB, WORK_TMPFS_MB, WORKDIR

_ETC = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives",
        "/etc/ssl/openssl.cnf")     # node reads OpenSSL's configuration at start-up
_BROWSER_ETC = ("/etc/fonts", "/etc/chromium", "/etc/chromium.d")   # fontconfig; Debian's Chromium settings


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
