"""llama-server's lifecycle: it answers once healthy, and no server survives the block, an exception in it, or a
kill -9 of the process that started it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, Workspace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, llama_cpp) -> Path:  # type: ignore[no-untyped-def]
    ws = Workspace(tmp_path_factory.mktemp("server"))
    ws.write_recipe("tiny", f"""
sources:
  a: {{path: {tiny_llama}}}
merge:
  merge_method: passthrough
  slices:
    - sources: [{{model: a, layer_range: [0, 4]}}]
""")
    ws.doit("convert")
    return ws.build / "tiny" / "tiny-BF16.gguf"


def servers() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "llama-server"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_serves_and_stops(gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from steps import server
    monkeypatch.setenv("MERGEFORGE_STORE", str(tmp_path / "cache"))
    before = set(servers())
    with server.serve(gguf, {"context": 512, "alias": "tiny-test"}, tmp_path / "server.log") as url:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as resp:
            models = json.loads(resp.read())
        assert any(m["id"] == "tiny-test" for m in models["data"]), models
        assert set(servers()) - before
        assert list((tmp_path / "cache" / "servers").glob("*.json"))
    assert set(servers()) <= before
    assert not list((tmp_path / "cache" / "servers").glob("*.json"))
    assert "127.0.0.1" in (tmp_path / "server.log").read_text()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt], ids=["failure", "ctrl-c"])
def test_stops_when_the_block_fails(error: type[BaseException], gguf: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from steps import server
    monkeypatch.setenv("MERGEFORGE_STORE", str(tmp_path / "cache"))
    before = set(servers())
    with pytest.raises(error), server.serve(gguf, {"context": 512}, tmp_path / "server.log"):
        assert set(servers()) - before
        raise error("a failing eval, or Ctrl-C in the middle of one")
    assert set(servers()) <= before
    assert not list((tmp_path / "cache" / "servers").glob("*.json"))


def test_dies_with_a_killed_parent_and_is_reaped(gguf: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of the process that started the server (doit, in a build): the kernel ends the server with it, and
    the next eval's reap() removes the pid file it left."""
    script = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from steps import server\n"
              f"with server.serve({str(gguf)!r}, {{'context': 512}}, {str(tmp_path / 'log')!r}) as url:\n"
              "    print(url, flush=True); time.sleep(600)\n")
    env = dict(os.environ, MERGEFORGE_STORE=str(tmp_path / "cache"))
    before = set(servers())
    parent = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None and parent.stdout.readline().startswith("http://127.0.0.1:")
    started = set(servers()) - before
    assert started
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while set(servers()) & started and time.time() < deadline:
        time.sleep(0.2)
    assert not set(servers()) & started, "llama-server outlived the process that started it"
    left = list((tmp_path / "cache" / "servers").glob("*.json"))
    assert len(left) == 1
    from steps import server
    monkeypatch.setenv("MERGEFORGE_STORE", str(tmp_path / "cache"))
    assert server.reap() == []                 # the server is gone already: only its pid file is left
    assert not list((tmp_path / "cache" / "servers").glob("*.json"))
