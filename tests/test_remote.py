"""The remote store (MERGEFORGE_REMOTE): a second checkout with its own empty local store restores every stage from
the remote without building it; a remote object with a flipped byte is never placed; a push killed half-way is
invisible and the next push completes it; `doit push`, `doit pull`, `doit verify --remote`. Through a file://
directory, and through a real S3 API server (moto's server mode) on loopback via s3fs."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Workspace
from test_faults import blake3_of, merge_recipe


def checkout(tmp_path: Path, name: str, model: Path) -> Workspace:
    ws = Workspace(tmp_path / name)
    ws.path.mkdir()
    ws.write_recipe("tiny", merge_recipe(model))
    return ws


def actions(ws: Workspace) -> dict[str, str]:
    return {str(e["stage"]): str(e["action"]) for e in ws.events("tiny")}


def lock(ws: Workspace) -> dict[str, Any]:
    return json.loads((ws.build / "tiny" / "lock.json").read_text())


def flip_remote(fs: Any, path: str) -> None:
    data = bytearray(fs.cat_file(path))
    data[4096] ^= 0xFF
    fs.pipe_file(path, bytes(data))


def remote_merge_file(fs: Any, root: str) -> str:
    (found,) = [p for p in fs.glob(f"{root}/store/*/*/merged/model.safetensors")]
    return str(found)


def share_and_tamper(tmp_path: Path, model: Path, url: str, env: dict[str, str], fs: Any, root: str) -> None:
    """The whole story on one remote: A builds and pushes; B restores it all; a flipped remote byte is refused
    and rebuilt by C (and pushed again); D restores the repaired entry."""
    env = {**env, "MERGEFORGE_REMOTE": url}
    a = checkout(tmp_path, "a", model)
    a.doit("merge", env=env)
    assert actions(a) == {"fetch:tiny": "built", "merge:tiny": "built"}
    assert "push: 0 entries pushed" in a.doit("push", env=env).output and "2 already there" in \
        a.doit("push", env=env).output                          # the build pushed each key it built

    b = checkout(tmp_path, "b", model)
    got = b.doit("merge", env=env)
    assert actions(b) == {"fetch:tiny": "pulled", "merge:tiny": "pulled"}, got.output
    assert lock(b)["stages"] == lock(a)["stages"]
    assert {k: v["digest"] for k, v in lock(b)["artifacts"].items()} == \
        {k: v["digest"] for k, v in lock(a)["artifacts"].items()}
    assert "0 bad" in b.doit("verify", "--full", "--remote", env=env).output

    obj = remote_merge_file(fs, root)
    flip_remote(fs, obj)
    bad = a.doit("verify", "--remote", "--full", env=env, check=False)
    assert bad.returncode != 0 and "differs from its manifest (merge:tiny)" in bad.output, bad.output
    c = checkout(tmp_path, "c", model)
    rebuilt = c.doit("merge", env=env)
    lines = [line for line in rebuilt.output.splitlines() if line.startswith("mergeforge: ")]
    assert len(lines) == 1 and "merge:tiny: remote object" in lines[0] and "merged/model.safetensors" in lines[0], \
        rebuilt.output
    assert "not placed, building it here" in lines[0]
    assert actions(c) == {"fetch:tiny": "pulled", "merge:tiny": "built"}
    assert blake3_of(c.build / "tiny" / "merged" / "model.safetensors") == \
        blake3_of(a.build / "tiny" / "merged" / "model.safetensors")
    assert "0 bad" in c.doit("verify", "--full", "--remote", env=env).output      # pushed again over the bad one
    d = checkout(tmp_path, "d", model)
    d.doit("merge", env=env)
    assert actions(d) == {"fetch:tiny": "pulled", "merge:tiny": "pulled"}


def test_a_second_checkout_restores_everything_from_a_file_remote(tmp_path: Path, tiny_llama: Path) -> None:
    import fsspec
    remote = tmp_path / "remote"
    share_and_tamper(tmp_path, tiny_llama, remote.as_uri(), {}, fsspec.filesystem("file"), str(remote))


def test_push_and_pull_without_building(tmp_path: Path, tiny_llama: Path) -> None:
    remote = {"MERGEFORGE_REMOTE": (tmp_path / "remote").as_uri()}
    a = checkout(tmp_path, "a", tiny_llama)
    a.doit("merge")                                          # no remote yet: built locally only
    pushed = a.doit("push", env=remote).output
    assert "push: merge:tiny (key" in pushed and "push: 2 entries pushed" in pushed, pushed
    assert "push: 0 entries pushed" in a.doit("push", env=remote).output               # idempotent

    b = checkout(tmp_path, "b", tiny_llama)
    pulled = b.doit("pull", env=remote, check=False)         # the recipe converts too: nobody built that yet
    assert pulled.returncode != 0 and "pull: 2 stages pulled" in pulled.output, pulled.output
    assert "pull: convert:tiny: key" in pulled.output and "build it with `doit convert:tiny`" in pulled.output
    assert actions(b) == {"fetch:tiny": "pulled", "merge:tiny": "pulled"}
    again = b.doit("merge", env=remote)                    # doit's own state learns them: restored, not built
    assert again.executed == ["fetch:tiny", "merge:tiny"]
    assert [e["action"] for e in b.events("tiny")] == ["pulled", "pulled", "restored", "restored"]
    assert b.doit("merge", env=remote).executed == []

    twin = checkout(tmp_path, "twin", tiny_llama)            # built the same keys on its own, offline
    twin.doit("merge")
    converged = twin.doit("push", env=remote).output
    assert "push: 0 entries pushed" in converged and "2 already there" in converged     # the first push won

    c = checkout(tmp_path, "c", tiny_llama)
    c.write_recipe("tiny", merge_recipe(tiny_llama, slices=((0, 2), (1, 4))))           # a merge nobody built
    missing = c.doit("pull", env=remote, check=False)
    assert missing.returncode != 0
    assert "pull: merge:tiny: key" in missing.output and "is in neither the local store nor the remote" in \
        missing.output and "build it with `doit merge:tiny`" in missing.output, missing.output
    assert actions(c) == {"fetch:tiny": "pulled"} and "1 of them wait for a stage above" in missing.output
    refused = c.doit("push", check=False)
    assert refused.returncode != 0 and "no remote store; set MERGEFORGE_REMOTE" in refused.output


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_a_push_killed_half_way_is_invisible_and_the_next_completes_it(tmp_path: Path, tiny_llama: Path, kind: str,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        request: pytest.FixtureRequest) -> None:
    url, extra = (tmp_path / "remote").as_uri(), {}
    if kind == "s3":
        import s3fs
        extra = request.getfixturevalue("s3_server")
        for k, v in extra.items():
            monkeypatch.setenv(k, v)
        s3fs.S3FileSystem(endpoint_url=extra["FSSPEC_S3_ENDPOINT_URL"], key="testing", secret="testing").mkdir("kill")
        url = "s3://kill/team"
    a = checkout(tmp_path, "a", tiny_llama)
    a.write_recipe("tiny", merge_recipe(tiny_llama, extra="  shard_bytes: 2000000\n"))
    a.doit("merge")
    for key, value in a.env().items():
        if key.startswith("MERGEFORGE_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("MERGEFORGE_REMOTE", url)
    from steps.store.keys import entry
    from steps.store.remote import configured
    key = json.loads((a.build / "tiny" / ".mf" / "merge.tiny.key").read_text())["key"]
    files = json.loads((entry(key) / "manifest.json").read_text())["outputs"]
    shards = [rel for rel in files if rel.endswith(".safetensors")]
    assert len(shards) >= 2, files
    remote = configured()
    assert remote is not None
    real_put = remote.fs.put_file
    calls = []

    def dies_after_two(lpath: str, rpath: str, *args: Any, **kwargs: Any) -> None:
        if len(calls) == 2:
            raise KeyboardInterrupt                               # the process is killed mid-push
        calls.append(rpath)
        real_put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(remote.fs, "put_file", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        remote.push(key, "merge:tiny")
    assert len(calls) == 2 and remote.manifest(key) is None and key not in remote.keys()   # no reader sees it
    monkeypatch.setattr(remote.fs, "put_file", real_put)
    total = sum(int(i["size"]) for i in files.values())
    landed = sum(int(files[rel]["size"]) for rel in sorted(files)[:2])
    sent = configured().push(key, "merge:tiny")                   # type: ignore[union-attr]
    assert sent == total - landed and remote.manifest(key) is not None
    b = checkout(tmp_path, "b", tiny_llama)
    b.write_recipe("tiny", merge_recipe(tiny_llama, extra="  shard_bytes: 2000000\n"))
    b.doit("merge", env={**extra, "MERGEFORGE_REMOTE": url})
    assert actions(b)["merge:tiny"] == "pulled" and actions(b)["fetch:tiny"] == "built"   # fetch was not pushed


# ------------------------------------------------------------------------------------------ S3, for real

@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """moto's S3 API server on loopback; the environment s3fs (botocore) needs to reach it."""
    pytest.importorskip("moto.server", reason="moto[server] is a test dependency (pip install -e '.[test]')")
    pytest.importorskip("s3fs", reason="s3fs is a test dependency (pip install -e '.[test]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    env = {"FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_the_same_through_an_s3_api_server(tmp_path: Path, tiny_llama: Path, s3_server: dict[str, str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["FSSPEC_S3_ENDPOINT_URL"], key="testing", secret="testing")
    fs.mkdir("mergeforge-test")
    share_and_tamper(tmp_path, tiny_llama, "s3://mergeforge-test/team", s3_server, fs, "mergeforge-test/team")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in (tmp_path / "a" / "build" / "tiny" / "lock.json").read_text()


# ------------------------------------------------------------------------- keys that name the machine

def test_the_keys_of_machine_dependent_stages_name_the_machine(tmp_path: Path, tiny_llama: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote serves bytes built elsewhere: an imatrix, a quant, a PPL or an eval made by a llama.cpp built for
    another CPU (or with CUDA, or with layers offloaded) is another key; fetch, merge and the converter's GGUF
    (Python, the same bytes on any machine) keep theirs, so every machine shares them."""
    from steps import toolchain
    from steps.plan import plan
    from steps.recipe import load
    from test_recipe import recipe
    path = tmp_path / "r.yaml"
    path.write_text(recipe(tiny_llama, bench="bench: {heldout: %s, chunks: 2, context: 64}\n"
                           % (Path(__file__).resolve().parent.parent / "recipes" / "data" / "heldout.txt")))
    stages = plan(load(path))
    here = {st.id: st.tools() for st in stages}
    assert here["imatrix:r"]["llama.cpp-target"] == toolchain.build_target()
    for machine in ("aarch64 asimd asimddp i8mm", toolchain.build_target() + " cuda"):
        monkeypatch.setattr(toolchain, "build_target", lambda machine=machine: machine)
        there = {st.id: st.tools() for st in stages}
        assert {i for i in here if here[i] != there[i]} == {"imatrix:r", "quantize:r-Q4_K_M", "bench:r",
                                                            "bench:r-Q4_K_M"}
    monkeypatch.undo()
    monkeypatch.setenv("MERGEFORGE_GPU_LAYERS", "99")
    offloaded = {st.id: st.tools() for st in stages}
    assert offloaded["bench:r"]["gpu_layers"] == "99" and offloaded["convert:r"] == here["convert:r"]


# --------------------------------------------------------------------------------- remote evals: input

@pytest.mark.parametrize(("server", "key", "needle"), [
    ("{url: 'localhost:8080'}", "eval.server.url", "expected http://host:port of a running OpenAI-compatible"),
    ("{url: 'http://gpu-box:8080', context: 8192}", "eval.server.context",
     "with eval.server.url the server runs elsewhere: set it there"),
    ("{api_key_env: VLLM_KEY}", "eval.server.api_key_env", "the server the stage starts needs none"),
    ("{url: 'http://gpu-box:8080', api_key_env: 'sk-abc123 xyz'}", "eval.server.api_key_env",
     "the name of an environment variable"),
])
def test_a_bad_remote_eval_names_the_file_and_key(tmp_path: Path, tiny_llama: Path, server: str, key: str,
                                                  needle: str) -> None:
    from test_recipe import error_for, recipe
    err = error_for(tmp_path, recipe(tiny_llama) + f"eval: {{ggufs: [Q4_K_M], server: {server}}}\n")
    assert err.key == key and needle in err.message, str(err)


def test_a_remote_eval_url_is_normalized_and_keyed(tmp_path: Path, tiny_llama: Path) -> None:
    from steps.plan import plan
    from steps.recipe import load
    from test_recipe import recipe
    path = tmp_path / "r.yaml"
    path.write_text(recipe(tiny_llama) + "eval: {ggufs: [Q4_K_M], server: {url: 'http://gpu-box:8080/v1/', "
                    "api_key_env: VLLM_API_KEY}}\n")
    (ev,) = [st for st in plan(load(path)) if st.kind == "eval"]
    assert ev.params["server"] == {"url": "http://gpu-box:8080", "api_key_env": "VLLM_API_KEY"}
