"""Hub sources (`hf: org/name`), tested without a network: a Hugging Face cache laid out in the test exactly as
huggingface_hub lays it out (models--org--name/{refs/<ref>, blobs/<etag>, snapshots/<commit>/<file> ->
../../blobs/<etag>}; the etag of an LFS file is its sha256, of a small git file its git blob sha1), then `doit` with
HF_HUB_CACHE pointing at it and HF_HUB_OFFLINE=1. The Hub's error answers (gated, private, missing revision) come
from a local HTTP server standing in for the Hub (HF_ENDPOINT): huggingface_hub itself is never replaced."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Workspace, assert_refused

REPO = "org/tiny"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".model", ".gguf")


def etag(name: str, data: bytes) -> str:
    """The name huggingface_hub gives a blob: the LFS sha256, or the git blob sha1 of a small text file."""
    if name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lay_out(cache: Path, files: dict[str, bytes | Path], *, repo: str = REPO, ref: str = "main",
            commit: str | None = None) -> str:
    """One commit of a repository in a Hugging Face cache, with refs/<ref> pointing at it. Returns the commit."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    data = {n: c.read_bytes() if isinstance(c, Path) else c for n, c in files.items()}
    commit = commit or hashlib.sha1(json.dumps({n: etag(n, d) for n, d in sorted(data.items())}).encode()).hexdigest()
    for name, content in data.items():
        blob = folder / "blobs" / etag(name, content)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(content)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    return commit


def model_files(model: Path) -> dict[str, bytes | Path]:
    return {p.name: p for p in sorted(model.iterdir()) if p.is_file()}


def recipe(source: str = "{hf: org/tiny}", layers: str = "[0, 4]") -> str:
    return (f"sources:\n  a: {source}\nmerge:\n  merge_method: passthrough\n  slices:\n"
            f"    - sources: [{{model: a, layer_range: {layers}}}]\n")


@pytest.fixture
def hub(workspace: Workspace) -> Path:
    return workspace.path / "hf-cache"


def offline(cache: Path, **extra: str) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_TOKEN": "", **extra}


def lock(ws: Workspace, name: str = "r") -> dict:
    return json.loads((ws.build / name / "lock.json").read_text())


def blob_of(cache: Path, commit: str, name: str, repo: str = REPO) -> Path:
    return (cache / ("models--" + repo.replace("/", "--")) / "snapshots" / commit / name).resolve()


# ------------------------------------------------------------------------------------------------ end to end

def test_offline_build_pins_the_commit_and_writes_no_token(workspace: Workspace, hub: Path, tiny_llama: Path) -> None:
    """Resolved from refs/main, pinned by the Hub's sha256s (blob names), merged from exactly the chosen files
    (not the README, licence or pickle beside them), with HF_TOKEN set: its value is in no file and no log."""
    extra = {"README.md": b"# tiny\n", "LICENSE": b"MIT\n", "pytorch_model.bin": b"not read"}
    commit = lay_out(hub, {**model_files(tiny_llama), **extra})
    workspace.write_recipe("r", recipe())
    token = "hf_" + secrets.token_hex(16)
    result = workspace.doit("merge", env=offline(hub, HF_TOKEN=token))
    assert "fetch:r" in result.executed and "merge:r" in result.executed
    source = lock(workspace)["sources"]["a"]
    chosen = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"}
    assert source["kind"] == "hf" and source["repo"] == REPO and source["ref"] == "main"
    assert source["revision"] == commit
    assert set(source["files"]) == chosen
    for name, info in source["files"].items():
        data = (tiny_llama / name).read_bytes()
        assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    merged = workspace.build / "r" / "merged"
    assert (merged / "tokenizer.model").read_bytes() == (tiny_llama / "tokenizer.model").read_bytes()
    assert not (merged / "LICENSE").exists() and not (merged / "README.md").exists()
    assert not (workspace.build / "r" / "sources").exists()          # nothing copied out of the cache
    written = [p for root in (workspace.build, workspace.store) for p in root.rglob("*") if p.is_file()]
    assert written
    for path in written:
        assert token.encode() not in path.read_bytes(), f"the token is in {path}"
    assert token not in result.output
    again = workspace.doit("merge", env=offline(hub, HF_TOKEN=token))
    assert again.executed == [], again.output


def test_a_locked_commit_wins_over_a_moved_branch_until_update(workspace: Workspace, hub: Path, tiny_llama: Path,
                                                               tiny_llama_b: Path) -> None:
    first = lay_out(hub, model_files(tiny_llama))
    workspace.write_recipe("r", recipe())
    workspace.doit("merge", env=offline(hub))
    merged = workspace.build / "r" / "merged" / "model.safetensors"
    before = merged.read_bytes()
    second = lay_out(hub, model_files(tiny_llama_b))                # refs/main moves to another commit
    assert second != first
    held = workspace.doit("merge", env=offline(hub))
    assert held.executed == [] and lock(workspace)["sources"]["a"]["revision"] == first
    other = workspace.doit("merge", env=offline(hub, MERGEFORGE_UPDATE="another-recipe"))
    assert other.executed == [] and lock(workspace)["sources"]["a"]["revision"] == first
    moved = workspace.doit("merge", env=offline(hub, MERGEFORGE_UPDATE="r:a"))
    assert {"fetch:r", "merge:r"} <= set(moved.executed), moved.output
    assert lock(workspace)["sources"]["a"]["revision"] == second
    assert merged.read_bytes() != before
    assert workspace.doit("merge", env=offline(hub)).executed == []


def test_a_cached_file_changed_behind_the_projects_back_is_refused(workspace: Workspace, hub: Path,
                                                                     tiny_llama: Path) -> None:
    commit = lay_out(hub, model_files(tiny_llama))
    r = workspace.write_recipe("r", recipe())
    workspace.doit("merge", env=offline(hub))
    blob = blob_of(hub, commit, "model.safetensors")
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF                                                  # same size, same name, other bytes
    blob.write_bytes(bytes(data))
    assert_refused(workspace, str(r), "sources.a.hf", "model.safetensors", f"{REPO}@{commit[:12]}",
                   "changed behind the project's back", args=("merge",), env=offline(hub), max_seconds=15)


def test_a_snapshot_link_moved_to_another_blob_is_refused(workspace: Workspace, hub: Path, tiny_llama: Path,
                                                          tiny_llama_b: Path) -> None:
    commit = lay_out(hub, model_files(tiny_llama))
    r = workspace.write_recipe("r", recipe())
    workspace.doit("merge", env=offline(hub))
    other = lay_out(hub, model_files(tiny_llama_b), ref="other")
    link = hub / "models--org--tiny" / "snapshots" / commit / "model.safetensors"
    link.unlink()
    link.symlink_to(os.path.relpath(blob_of(hub, other, "model.safetensors"), link.parent))
    assert_refused(workspace, str(r), "sources.a.hf", "has sha256", "says", args=("merge",), env=offline(hub),
                   max_seconds=15)


def test_pickled_weights_are_refused_without_opt_in(workspace: Workspace, hub: Path, tiny_llama: Path) -> None:
    files = {n: p for n, p in model_files(tiny_llama).items() if not n.endswith(".safetensors")}
    lay_out(hub, {**files, "pytorch_model.bin": pickled_state(tiny_llama)})
    r = workspace.write_recipe("r", recipe())
    assert_refused(workspace, str(r), "sources.a.hf", "only pickled ones (pytorch_model.bin)", "allow_pickle: true",
                   args=("merge",), env=offline(hub), max_seconds=15)


def pickled_state(model: Path) -> bytes:
    import io

    import torch
    from safetensors.torch import load_file
    buffer = io.BytesIO()
    torch.save(load_file(model / "model.safetensors"), buffer)
    return buffer.getvalue()


def test_allow_pickle_converts_with_weights_only(workspace: Workspace, hub: Path, tiny_llama: Path) -> None:
    from safetensors.torch import load_file
    files = {n: p for n, p in model_files(tiny_llama).items() if not n.endswith(".safetensors")}
    lay_out(hub, {**files, "pytorch_model.bin": pickled_state(tiny_llama), "training_args.bin": b"trainer state"})
    workspace.write_recipe("r", recipe("{hf: org/tiny, allow_pickle: true}"))
    workspace.doit("merge", env=offline(hub))
    converted = workspace.build / "r" / "sources" / "a"
    assert sorted(p.name for p in converted.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"])
    want = load_file(tiny_llama / "model.safetensors")
    got = load_file(workspace.build / "r" / "merged" / "model.safetensors")
    assert set(got) == set(want) and all(got[k].equal(want[k]) for k in want)
    source = lock(workspace)["sources"]["a"]
    assert source["allow_pickle"] is True and "pytorch_model.bin" in source["files"]
    assert "training_args.bin" not in source["files"]


class Exploit:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch " + os.environ["EXPLOIT_MARK"],))


def test_a_pickle_that_runs_code_is_refused_by_weights_only(workspace: Workspace, hub: Path, tiny_llama: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    import torch
    mark = workspace.path / "exploited"
    monkeypatch.setenv("EXPLOIT_MARK", str(mark))
    buffer = io.BytesIO()
    torch.save({"model.embed_tokens.weight": Exploit()}, buffer)
    files = {n: p for n, p in model_files(tiny_llama).items() if not n.endswith(".safetensors")}
    lay_out(hub, {**files, "pytorch_model.bin": buffer.getvalue()})
    r = workspace.write_recipe("r", recipe("{hf: org/tiny, allow_pickle: true}"))
    assert_refused(workspace, str(r), "sources.a.allow_pickle", "pytorch_model.bin",
                   "refused by torch's weights_only loader", args=("merge",), env=offline(hub), max_seconds=30)
    assert not mark.exists()


def test_a_repository_without_weights_is_refused(workspace: Workspace, hub: Path, tiny_llama: Path) -> None:
    lay_out(hub, {n: p for n, p in model_files(tiny_llama).items() if not n.endswith(".safetensors")})
    r = workspace.write_recipe("r", recipe())
    assert_refused(workspace, str(r), "sources.a.hf", "no model weights", "model.safetensors", args=("merge",),
                   env=offline(hub), max_seconds=15)


def test_offline_without_the_repository_in_the_cache(workspace: Workspace, hub: Path) -> None:
    hub.mkdir()
    r = workspace.write_recipe("r", recipe("{hf: org/tiny, revision: v1.0}"))
    assert_refused(workspace, str(r), "sources.a.hf", "org/tiny at revision 'v1.0'", str(hub.resolve()),
                   "HF_HUB_OFFLINE=1", args=("merge",), env=offline(hub), max_seconds=15)


def test_a_locked_file_missing_from_the_cache_offline(workspace: Workspace, hub: Path, tiny_llama: Path) -> None:
    commit = lay_out(hub, model_files(tiny_llama))
    r = workspace.write_recipe("r", recipe())
    workspace.doit("merge", env=offline(hub))
    (hub / "models--org--tiny" / "snapshots" / commit / "tokenizer.model").unlink()
    assert_refused(workspace, str(r), "sources.a.hf", "tokenizer.model of org/tiny", f"commit {commit[:12]}",
                   "lock.json", "HF_HUB_OFFLINE=1", args=("merge",), env=offline(hub), max_seconds=15)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_network_and_no_cache(workspace: Workspace, hub: Path) -> None:
    hub.mkdir()
    r = workspace.write_recipe("r", recipe())
    env = {"HF_HUB_CACHE": str(hub), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HUB_OFFLINE": "0"}
    assert_refused(workspace, str(r), "sources.a.hf", "org/tiny at revision 'main'", "the Hub cannot be reached",
                   "give its directory as path:", args=("merge",), env=env, max_seconds=15)


class FakeHubServer:
    """A local HTTP server standing in for the Hub (HF_ENDPOINT): the endpoints huggingface_hub calls to resolve a
    revision (/api/models/<repo>/revision/<rev>), list a commit (/api/models/<repo>/tree/<commit>) and download a
    file (/<repo>/resolve/<commit>/<file>, with the X-Repo-Commit, ETag and X-Linked-Etag headers the Hub sends),
    serving the repositories in ``repos``; or, with ``error`` set, that status and X-Error-Code for every request
    (how the Hub says gated, not found, revision not found). ``downloads`` logs each file GET."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Any]] = {}     # repo -> {"refs": {ref: commit}, "commits": {commit: files}}
        self.error: tuple[int, str] | None = None
        self.downloads: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.answer(self)

            def do_HEAD(self) -> None:  # noqa: N802
                server.answer(self)

            def log_message(self, *args: object) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def publish(self, repo: str, files: dict[str, bytes | Path], ref: str = "main") -> str:
        data = {n: c.read_bytes() if isinstance(c, Path) else c for n, c in files.items()}
        commit = hashlib.sha1(json.dumps({n: etag(n, d) for n, d in sorted(data.items())}).encode()).hexdigest()
        entry = self.repos.setdefault(repo, {"refs": {}, "commits": {}})
        entry["commits"][commit] = data
        entry["refs"][ref] = commit
        return commit

    def answer(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(handler.path).path)
        status, headers, body = 404, {"X-Error-Code": "EntryNotFound"}, b"{}"
        if self.error is not None:
            status, headers = self.error[0], {"X-Error-Code": self.error[1]}
        elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path):
            repo = self.repos.get(m[1])
            commit = repo and (repo["refs"].get(m[2]) or (m[2] if m[2] in repo["commits"] else None))
            if commit:
                files = repo["commits"][commit]
                status, headers = 200, {"Content-Type": "application/json"}
                body = json.dumps({"id": m[1], "sha": commit, "siblings": [{"rfilename": n} for n in files]}).encode()
            else:
                headers = {"X-Error-Code": "RevisionNotFound" if repo else "RepoNotFound"}
        elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([0-9a-f]{40})/?", path):
            files = self.repos[m[1]]["commits"][m[2]]
            status, headers = 200, {"Content-Type": "application/json"}
            body = json.dumps([{"type": "file", "path": n, "size": len(d), "oid": etag("x.json", d),
                                **({"lfs": {"oid": etag(n, d), "size": len(d), "pointerSize": 134}}
                                   if n.endswith(LFS_SUFFIXES) else {})} for n, d in files.items()]).encode()
        elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([0-9a-f]{40})/(.+)", path):
            data = self.repos[m[1]]["commits"][m[2]][m[3]]
            status, body = 200, data
            headers = {"X-Repo-Commit": m[2], "ETag": f'"{etag("x.json", data)}"'}
            if m[3].endswith(LFS_SUFFIXES):
                headers.update({"X-Linked-Etag": f'"{etag(m[3], data)}"', "X-Linked-Size": str(len(data))})
            if handler.command == "GET":
                self.downloads.append(m[3])
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if handler.command == "GET":
            handler.wfile.write(body)


@pytest.fixture
def fake_hub() -> Iterator[FakeHubServer]:
    server = FakeHubServer()
    yield server
    server.http.shutdown()


def online(cache: Path, server: FakeHubServer, **extra: str) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1", **extra}


def test_online_downloads_only_the_chosen_files_then_builds_offline(workspace: Workspace, hub: Path,
                                                                    fake_hub: FakeHubServer, tiny_llama: Path,
                                                                    tiny_llama_b: Path) -> None:
    """The real transfer (huggingface_hub's snapshot_download against a stand-in Hub): only the chosen files are
    downloaded, into the cache's layout; the lock has the Hub's sha256s; the next build needs no network."""
    extra = {"README.md": b"# tiny\n", "consolidated.safetensors": b"not the model", "pytorch_model.bin": b"pickle"}
    commit = fake_hub.publish(REPO, {**model_files(tiny_llama), **extra})
    workspace.write_recipe("r", recipe())
    token = "hf_" + secrets.token_hex(16)
    workspace.doit("merge", env=online(hub, fake_hub, HF_TOKEN=token))
    assert sorted(fake_hub.downloads) == sorted(model_files(tiny_llama))
    source = lock(workspace)["sources"]["a"]
    assert source["revision"] == commit
    weights = (tiny_llama / "model.safetensors").read_bytes()
    assert source["files"]["model.safetensors"] == {"size": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}
    assert blob_of(hub, commit, "model.safetensors").name == hashlib.sha256(weights).hexdigest()
    assert (hub / "models--org--tiny" / "refs" / "main").read_text() == commit
    for path in [p for root in (workspace.build, workspace.store, hub) for p in root.rglob("*") if p.is_file()]:
        assert token.encode() not in path.read_bytes(), f"the token is in {path}"
    assert workspace.doit("merge", env=offline(hub)).executed == []
    moved = fake_hub.publish(REPO, model_files(tiny_llama_b))          # main moves on the Hub
    assert workspace.doit("merge", env=online(hub, fake_hub)).executed == []
    fake_hub.downloads.clear()
    updated = workspace.doit("merge", env=online(hub, fake_hub, MERGEFORGE_UPDATE="1"))
    assert {"fetch:r", "merge:r"} <= set(updated.executed) and lock(workspace)["sources"]["a"]["revision"] == moved
    assert sorted(fake_hub.downloads) == ["model.safetensors"]        # the other files' blobs were in the cache


@pytest.mark.parametrize(("status", "code", "key", "needle"), [
    (403, "GatedRepo", "hf", "is gated: accept its conditions at"),
    (401, "RepoNotFound", "hf", "not found on the Hub, or it is private"),
    (404, "RevisionNotFound", "revision", "revision 'v9' not found in org/tiny"),
])
def test_hub_refusals(workspace: Workspace, hub: Path, fake_hub: FakeHubServer, status: int, code: str, key: str,
                      needle: str) -> None:
    fake_hub.error = (status, code)
    hub.mkdir()
    r = workspace.write_recipe("r", recipe("{hf: org/tiny, revision: v9}"))
    token = "hf_" + secrets.token_hex(16)
    line = assert_refused(workspace, str(r), f"sources.a.{key}", needle, args=("merge",),
                          env=online(hub, fake_hub, HF_TOKEN=token), max_seconds=15)
    assert token not in line


# ---------------------------------------------------------------------------------------------- in process

def test_the_cache_folder_is_named_as_huggingface_hub_names_it() -> None:
    from huggingface_hub.file_download import repo_folder_name

    from steps.hub import storage
    for repo_type in ("model", "dataset", "space"):
        assert storage(REPO, repo_type, Path("/c")) == Path("/c") / repo_folder_name(repo_id=REPO, repo_type=repo_type)


def test_update_requested(monkeypatch: pytest.MonkeyPatch) -> None:
    from steps.hub import update_requested
    for value, expected in (("", False), ("0", False), ("1", True), ("all", True), ("r", True), ("r:a", True),
                            ("r:b", False), ("x, r", True), ("rr", False)):
        monkeypatch.setenv("MERGEFORGE_UPDATE", value)
        assert update_requested("r", "a") is expected, value


def listing(*names: str) -> dict:
    from steps.hub import HubFile
    return {n: HubFile(1, None) for n in names}


def test_select_model_takes_the_index_shards_and_leaves_the_rest(tmp_path: Path) -> None:
    from steps.hub import select_model
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    files = listing("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "chat_template.jinja", "special_tokens_map.json", "model.safetensors.index.json",
                    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                    "consolidated.safetensors", "pytorch_model.bin", "README.md", "original/params.json",
                    ".gitattributes")
    assert select_model(files, lambda name: index) == sorted([
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
        "special_tokens_map.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors"])


@pytest.mark.parametrize(("shard", "needle"), [("../../../etc/passwd", "not a .safetensors file"),
                                               ("sub/model.safetensors", "not a .safetensors file")])
def test_an_index_naming_a_file_outside_is_refused(tmp_path: Path, shard: str, needle: str) -> None:
    from steps.hub import HubError, select_model
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(HubError, match=needle):
        select_model(listing("config.json", "model.safetensors.index.json"), lambda name: index)


def test_select_model_pickles() -> None:
    from steps.hub import HubError, select_model
    files = listing("config.json", "tokenizer.json", "pytorch_model.bin", "training_args.bin", "optimizer.pt")
    with pytest.raises(HubError, match="only pickled ones"):
        select_model(files, lambda name: Path())
    assert select_model(files, lambda name: Path(), allow_pickle=True) == [
        "config.json", "pytorch_model.bin", "tokenizer.json"]
    with pytest.raises(HubError, match="remove allow_pickle") as err:
        select_model(listing("config.json", "model.safetensors"), lambda name: Path(), allow_pickle=True)
    assert err.value.key == "allow_pickle"
    with pytest.raises(HubError, match="no config.json"):
        select_model(listing("model.safetensors"), lambda name: Path())


def test_a_lock_naming_a_path_outside_the_snapshot_is_refused(tmp_path: Path) -> None:
    from steps.hub import HubError, Sha256Cache, pin, select_model
    locked = {"revision": "a" * 40, "files": {"../../../../etc/passwd": {"size": 1, "sha256": "b" * 64}}}
    with pytest.raises(HubError, match="not a file of a commit"):
        pin(REPO, "main", select=select_model, digests=Sha256Cache(tmp_path / "d.json"), locked=locked,
            cache=tmp_path, lock_name="lock.json")
    with pytest.raises(HubError, match="malformed"):
        pin(REPO, "main", select=select_model, digests=Sha256Cache(tmp_path / "d.json"), locked={"files": 3},
            cache=tmp_path, lock_name="lock.json")


def test_a_dataset_repository_pins_the_same_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The function the heal's Hub datasets will call: repo_type="dataset", its own file selection."""
    from huggingface_hub import constants

    from steps.hub import Sha256Cache, pin, view
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf"
    folder = cache / "datasets--org--chat"
    commit = "c" * 40
    data = b"parquet bytes"
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    link = folder / "snapshots" / commit / "data" / "train-00000.parquet"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    pinned = pin("org/chat", "main", repo_type="dataset", cache=cache, digests=Sha256Cache(tmp_path / "d.json"),
                 select=lambda files, one: sorted(n for n in files if n.endswith(".parquet")))
    assert pinned.record() == {"kind": "hf", "repo": "org/chat", "repo_type": "dataset", "ref": "main",
                               "revision": commit, "files": {"data/train-00000.parquet": {
                                   "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}
    directory = view(pinned, tmp_path / "views")
    assert (directory / "data" / "train-00000.parquet").read_bytes() == data


@pytest.mark.parametrize(("source", "key", "needle"), [
    ("{hf: 'org/bad name'}", "sources.a.hf", "expected a Hub repository id"),
    ("{hf: ../../etc}", "sources.a.hf", "expected a Hub repository id"),
    ("{hf: org/tiny, revision: 1234}", "sources.a.revision", "quote it"),
    ("{hf: org/tiny, revision: ../x}", "sources.a.revision", "expected a branch, tag or commit"),
    ("{hf: org/tiny, allow_pickle: yes please}", "sources.a.allow_pickle", "true or false"),
    ("{hf: org/tiny, sha256: " + "a" * 64 + "}", "sources.a.sha256", "applies to package: sources only"),
    ("{path: /nowhere, revision: main}", "sources.a.revision", "applies to hf: sources only"),
])
def test_hub_source_validation(tmp_path: Path, source: str, key: str, needle: str) -> None:
    from steps.errors import RecipeError
    from steps.recipe import load
    f = tmp_path / "r.yaml"
    f.write_text(recipe(source))
    with pytest.raises(RecipeError) as err:
        load(f)
    assert err.value.key == key and needle in err.value.message, err.value


def test_a_hub_source_normalizes(tmp_path: Path) -> None:
    from steps.plan import plan
    from steps.recipe import load
    f = tmp_path / "r.yaml"
    f.write_text(recipe("{hf: org/tiny}"))
    r = load(f)
    assert r.sources["a"].spec == {"hf": "org/tiny", "revision": "main"} and r.sources["a"].path is None
    assert plan(r)[0].outputs == ()                   # read from the cache, nothing placed in build/
    f.write_text(recipe("{hf: org/tiny, revision: refs/pr/1, allow_pickle: true}"))
    r = load(f)
    assert r.sources["a"].spec == {"hf": "org/tiny", "revision": "refs/pr/1", "allow_pickle": True}
    assert plan(r)[0].outputs == ("sources/a/config.json",)


def test_a_view_is_links_to_the_cache_blobs(tmp_path: Path) -> None:
    """A view holds the pinned files as links through its blobs/ link to the cache's blobs (model_files accepts
    them, as in a cache snapshot); made once, and removing it leaves the cache intact."""
    from steps.hashing import model_files
    from steps.hub import Pinned, view
    cache = tmp_path / "hf" / "models--org--tiny"
    blob = cache / "blobs" / ("d" * 64)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"x")
    link = cache / "snapshots" / ("e" * 40) / "config.json"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    pinned = Pinned(REPO, "model", "main", "e" * 40, {"config.json": {"size": 1, "sha256": "d" * 64}}, link.parent)
    directory = view(pinned, tmp_path / "views")
    assert view(pinned, tmp_path / "views") == directory
    assert os.readlink(directory / "config.json") == "../../blobs/" + "d" * 64
    assert model_files(directory) == [directory / "config.json"]
    assert (directory / "config.json").resolve() == blob
    shutil.rmtree(tmp_path / "views")
    assert blob.read_bytes() == b"x"
