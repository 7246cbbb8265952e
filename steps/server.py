"""llama-server for the evals: started on a free loopback port, waited for, and always stopped.

``serve(gguf, options, log)`` is a context manager that yields the server's base URL. The server is stopped on
success, on failure and on Ctrl-C (the ``finally``), and dies with the process that started it when that process is
killed outright (``kill -9`` of doit: the kernel sends the server SIGKILL through PR_SET_PDEATHSIG). Each server
also leaves a small pid file under ``cache/servers/``; ``reap()`` (run before every eval) stops any server whose
starter is gone, so no llama-server outlives a build, ever.

Options (the recipe's ``eval.server`` block; machine settings come from the environment and change no key):
context, flash_attn (on | off | auto), batch, ubatch, parallel (slots), cache_type_k / cache_type_v, jinja,
chat_template (a file, relative to the recipe), alias, reasoning_budget, reasoning_format. ``MERGEFORGE_THREADS`` and
``MERGEFORGE_GPU_LAYERS`` as for every llama.cpp program.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from steps import toolchain
from steps.errors import StepFailed
from steps.files import process_alive

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
SERVER_DEFAULTS: dict[str, Any] = {"context": 4096, "flash_attn": "auto", "batch": 2048, "ubatch": 512,
                                   "parallel": 1, "cache_type_k": "f16", "cache_type_v": "f16", "jinja": True,
                                   "alias": None, "chat_template": None, "reasoning_budget": None,
                                   "reasoning_format": None, "url": None, "api_key_env": None}
# Options of the llama-server the stage starts itself: with eval.server.url the server runs elsewhere, set there.
LAUNCH_ONLY = ("context", "flash_attn", "batch", "ubatch", "cache_type_k", "cache_type_v", "jinja", "chat_template",
               "reasoning_budget", "reasoning_format")


def api_key(options: dict[str, Any]) -> str:
    """The API key a remote server wants, from the environment variable eval.server.api_key_env names (the recipe
    holds the name, never the key)."""
    name = options.get("api_key_env")
    if not name:
        return "mergeforge-local"
    value = os.environ.get(str(name))
    if not value:
        raise StepFailed(f"eval.server.api_key_env names {name}, which is not set; export {name}=<the server's API "
                         "key> and run doit again")
    return value


def _get(url: str, path: str, key: str, timeout_s: float = 30) -> Any:
    request = urllib.request.Request(f"{url}{path}", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def identity(url: str, key: str) -> dict[str, Any]:
    """What an already running OpenAI-compatible server says it serves: the ids of /v1/models and, from
    llama-server, its model file's name (/props model_path) and the model's parameter count and size in bytes
    (/v1/models meta). Raises StepFailed in one line when the server does not answer."""
    try:
        models = _get(url, "/v1/models", key)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise StepFailed(f"the server at {url} does not answer GET /v1/models ({exc}); start it, or fix "
                         "eval.server.url") from None
    found: dict[str, Any] = {"models": sorted(str(m.get("id")) for m in models.get("data", []))}
    meta = next((m.get("meta") for m in models.get("data", []) if isinstance(m.get("meta"), dict)), None)
    if meta:
        found.update({k: meta[k] for k in ("n_params", "size", "n_vocab") if k in meta})
    try:
        props = _get(url, "/props", key)
        if props.get("model_path"):
            found["model_file"] = Path(str(props["model_path"])).name
    except (urllib.error.URLError, OSError, ValueError):
        pass                                         # vLLM, SGLang: no /props
    return found


@contextlib.contextmanager
def running(url: str, log: Path, key: str) -> Iterator[str]:
    """An already running server, for the length of the block (nothing is started or stopped): its log says so."""
    with open(log, "a") as out:
        out.write(f"mergeforge: evaluated against the server at {url}, started outside the stage; its log is "
                  "that server's own\n")
    identity(url, key)
    yield url.rstrip("/")


def servers_dir() -> Path:
    from steps.settings import store_root
    return store_root() / "servers"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the parent dies (Linux), and a process group of its own."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setsid()


def argv(gguf: Path, options: dict[str, Any], port: int, mmproj: Path | None = None) -> list[str]:
    from steps.settings import threads
    o = {**SERVER_DEFAULTS, **options}
    out = [toolchain.locate().program("llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-c", str(o["context"]), "-fa", str(o["flash_attn"]), "-b", str(o["batch"]), "-ub", str(o["ubatch"]),
           "-np", str(o["parallel"]), "-ctk", str(o["cache_type_k"]), "-ctv", str(o["cache_type_v"]),
           "-t", str(threads()), "--no-webui", "--cache-ram", "0", *toolchain.gpu_args()]
    if o["jinja"]:
        out.append("--jinja")
    if o["alias"]:
        out += ["--alias", str(o["alias"])]
    if o["chat_template"]:
        out += ["--chat-template-file", str(o["chat_template"])]
    if o["reasoning_budget"] is not None:
        out += ["--reasoning-budget", str(o["reasoning_budget"])]
    if o["reasoning_format"] is not None:
        out += ["--reasoning-format", str(o["reasoning_format"])]
    if mmproj is not None:
        out += ["--mmproj", str(mmproj)]
    return out


@contextlib.contextmanager
def serve(gguf: Path, options: dict[str, Any], log: Path, *, mmproj: Path | None = None,
          timeout_s: float = 300) -> Iterator[str]:
    """Run llama-server on the GGUF for the length of the block; yields its base URL (``http://127.0.0.1:N``)."""
    reap()
    port = free_port()
    cmd = argv(gguf, options, port, mmproj)
    logger.info("llama-server: %s", " ".join(cmd))
    servers_dir().mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)  # noqa: PLW1509 - prctl must run in the child
    pid_file = servers_dir() / f"{proc.pid}.json"
    pid_file.write_text(json.dumps({"pid": proc.pid, "parent": os.getpid(), "port": port, "gguf": str(gguf)}))
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log, timeout_s)
        yield url
    finally:
        stop(proc)
        pid_file.unlink(missing_ok=True)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-8:]
            raise StepFailed(f"llama-server exited ({proc.returncode}) before it was ready: "
                             f"{' | '.join(t.strip() for t in tail)}; its log is {log}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise StepFailed(f"llama-server was not ready after {timeout_s:.0f} s; its log is {log}")


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after the grace period."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def reap() -> list[int]:
    """Stop every llama-server a dead process started (a pid file whose ``parent`` is gone); returns their pids."""
    stopped = []
    for pid_file in sorted(servers_dir().glob("*.json")) if servers_dir().exists() else ():
        try:
            info = json.loads(pid_file.read_text())
        except (OSError, ValueError):
            pid_file.unlink(missing_ok=True)
            continue
        if process_alive(info["parent"]):
            continue
        if process_alive(info["pid"]) and "llama-server" in _cmdline(info["pid"]):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(info["pid"], signal.SIGKILL)
            stopped.append(int(info["pid"]))
        pid_file.unlink(missing_ok=True)
    return stopped


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
