"""Publishing (`doit publish:<recipe>`), tested without a network: the pure plan (which file goes to which
repository, split decisions, what is skipped as already uploaded given a remote listing) and the model card; the
GGUF split with the real llama-gguf-split; and the transfer against FakeHub, an object standing in for
huggingface_hub's HfApi (list_repo_tree, create_repo, create_commit) because no Hub can be reached from CI."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, Workspace

GOOD_DIGEST = "0" * 64


def recipe_text(model: Path, publish: str, extra: str = "") -> str:
    return (f"description: a test merge\nsources:\n  a: {{path: {model}}}\nmerge:\n  merge_method: passthrough\n"
            "  slices:\n    - sources: [{model: a, layer_range: [0, 4]}]\n" + extra + publish)


def load(tmp_path: Path, text: str) -> Any:
    from steps.recipe import load as load_recipe
    f = tmp_path / "r.yaml"
    f.write_text(text)
    return load_recipe(f)


PUBLISH = "publish:\n  model: org/m\n  gguf: org/m-GGUF\n  quants: [BF16, Q8_0]\n  split_bytes: 2000000\n"


def manifests(sizes: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    s = {"merged/config.json": 700, "merged/model.safetensors": 5_000_000, "merged/tokenizer.model": 250_000,
         "r-BF16.gguf": 5_100_000, "r-Q8_0.gguf": 1_500_000, "r-Q4_K_M.gguf": 900_000, **(sizes or {})}

    def out(*names: str) -> dict[str, Any]:
        return {"outputs": {n: {"size": s[n], "digest": hashlib.sha256(n.encode()).hexdigest()} for n in names}}
    return {"merge:r": out("merged/config.json", "merged/model.safetensors", "merged/tokenizer.model"),
            "convert:r": {**out("r-BF16.gguf"), "main": "r-BF16.gguf"},
            "quantize:r-Q8_0": out("r-Q8_0.gguf"), "quantize:r-Q4_K_M": out("r-Q4_K_M.gguf")}


# ------------------------------------------------------------------------------------------------ the plan

def test_plan_files_and_split_decisions(tmp_path: Path, tiny_llama: Path) -> None:
    from steps.publish import needs, plan_files, to_split
    r = load(tmp_path, recipe_text(tiny_llama, PUBLISH, "quantize: [Q4_K_M, Q8_0]\n"))
    assert needs(r) == ["merge:r", "convert:r", "quantize:r-Q8_0"]
    files = plan_files(r, manifests(), tmp_path / "build" / "r")
    assert {f.path_in_repo: f.size for f in files["org/m"]} == {
        "config.json": 700, "model.safetensors": 5_000_000, "tokenizer.model": 250_000}
    assert files["org/m"][1].local == tmp_path / "build" / "r" / "merged" / "model.safetensors"
    assert [f.path_in_repo for f in files["org/m-GGUF"]] == ["r-BF16.gguf", "r-Q8_0.gguf"]   # Q4_K_M not chosen
    assert [f.path_in_repo for f in to_split(files["org/m-GGUF"], 2_000_000)] == ["r-BF16.gguf"]
    assert to_split(files["org/m"], 2_000_000) == []                    # only GGUFs are split
    assert to_split(files["org/m-GGUF"], 50_000_000_000) == []


def test_gguf_parts_the_build_split_are_published_as_they_are(tmp_path: Path, tiny_llama: Path) -> None:
    """With gguf.split_max_size the build's GGUFs are already llama-gguf-split parts: every part goes up, none is
    split again, and the card's row (benched by the first part) names them."""
    from steps.publish import model_card, plan_files, to_split
    r = load(tmp_path, recipe_text(tiny_llama, PUBLISH, "quantize: [Q4_K_M, Q8_0]\n"))
    parts = {f"r-BF16-0000{i}-of-00003.gguf": 1_900_000 for i in (1, 2, 3)}
    built = manifests(parts)
    built["convert:r"] = {"outputs": {n: {"size": size, "digest": GOOD_DIGEST} for n, size in parts.items()},
                          "main": "r-BF16-00001-of-00003.gguf"}
    files = plan_files(r, built, tmp_path)["org/m-GGUF"]
    assert [f.path_in_repo for f in files] == [*parts, "r-Q8_0.gguf"]
    assert to_split(files, 1_000_000) == [files[-1]]
    board = {"settings": {}, "models": [{"variant": "r", "file": "r-BF16-00001-of-00003.gguf", "type": "base",
                                         "size": 5_700_000, "ppl": 12.5}]}
    card = model_card(r, "gguf", lock={}, scoreboard=board, llama_cpp=None, files=[f.path_in_repo for f in files],
                      recipe_text="", mergeforge="0.1.0")
    assert "| `r-BF16.gguf` (3 parts: `r-BF16-00001-of-00003.gguf`, " in card
    assert "| unquantized | 5.7 MB | 12.5000 |" in card


def test_plan_files_needs_the_built_stages(tmp_path: Path, tiny_llama: Path) -> None:
    from steps.errors import StepFailed
    from steps.publish import plan_files
    r = load(tmp_path, recipe_text(tiny_llama, PUBLISH, "quantize: [Q4_K_M, Q8_0]\n"))
    built = manifests()
    del built["quantize:r-Q8_0"]
    with pytest.raises(StepFailed, match=r"quantize:r-Q8_0 has not been built; run `doit quantize:r-Q8_0`"):
        plan_files(r, built, tmp_path)


def test_plan_uploads_skips_what_the_hub_holds(tmp_path: Path) -> None:
    from steps.publish import LocalFile, RemoteFile, git_sha1, plan_uploads
    for name, data in (("model.safetensors", b"w" * 1000), ("config.json", b"{}"), ("README.md", b"# card\n"),
                       ("tokenizer.model", b"t" * 100), ("new.gguf", b"g" * 10)):
        (tmp_path / name).write_bytes(data)
    files = [LocalFile("org/m", p.name, p, p.stat().st_size) for p in sorted(tmp_path.iterdir())]
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    remote = {
        "model.safetensors": RemoteFile(1000, sha["model.safetensors"], "x"),      # same LFS sha256: skipped
        "config.json": RemoteFile(2, None, git_sha1(tmp_path / "config.json")),     # same git blob: skipped
        "README.md": RemoteFile(7, None, "an older card"),                           # other blob: uploaded
        "tokenizer.model": RemoteFile(99, sha["tokenizer.model"], "x"),            # other size: uploaded, not hashed
        "stale.gguf": RemoteFile(5, GOOD_DIGEST, "x"),                              # only remote: left alone
    }
    hashed: list[str] = []

    def sha256(path: Path) -> str:
        hashed.append(path.name)
        return sha[path.name]

    upload, skip = plan_uploads(files, remote, sha256, git_sha1)
    assert sorted(f.path_in_repo for f in upload) == ["README.md", "new.gguf", "tokenizer.model"]
    assert sorted(f.path_in_repo for f in skip) == ["config.json", "model.safetensors"]
    assert hashed == ["model.safetensors"]
    upload, skip = plan_uploads(files, None, sha256, git_sha1)           # a repository that does not exist yet
    assert len(upload) == len(files) and skip == []


def front_matter(card: str) -> tuple[dict[str, Any], str]:
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


LOCK = {"sources": {
    "a": {"kind": "hf", "repo": "org/base", "ref": "main", "revision": "a" * 40, "files": {}},
    "b": {"kind": "hf", "repo": "org/other", "ref": "v2", "revision": "b" * 40, "files": {}}}}
SCOREBOARD = {"schema": 2, "recipe": "r", "variants": ["r"], "llama_cpp": "llama.cpp-0c1e57098",
              "settings": {"context": 256, "chunks": 16},
              "models": [{"variant": "r", "file": "r-BF16.gguf", "type": "base", "size": 5_100_000, "ppl": 16.0312},
                         {"variant": "r", "file": "r-Q8_0.gguf", "type": "Q8_0", "size": 1_500_000, "ppl": 16.0441,
                          "kld_mean": 0.00441, "same_top_p_percent": 96.52}]}
HUB_RECIPE = ("description: two bases, stacked\nsources:\n  a: {hf: org/base}\n  b: {hf: org/other, revision: v2}\n"
              "merge:\n  merge_method: slerp\n  base_model: a\n  parameters: {t: 0.5}\n"
              "  slices:\n    - sources: [{model: a, layer_range: [0, 4]}, {model: b, layer_range: [0, 4]}]\n"
              "quantize: [Q8_0]\npublish:\n  model: org/m\n  gguf: org/m-GGUF\n  license: apache-2.0\n")


def test_model_cards(tmp_path: Path) -> None:
    from steps.publish import model_card
    r = load(tmp_path, HUB_RECIPE)
    kwargs = {"lock": LOCK, "scoreboard": SCOREBOARD, "llama_cpp": "llama.cpp-0c1e57098", "recipe_text": HUB_RECIPE,
              "mergeforge": "0.1.0"}
    card = model_card(r, "model", files=["config.json", "model.safetensors"], **kwargs)
    front, body = front_matter(card)
    assert front == {"base_model": ["org/base", "org/other"], "base_model_relation": "merge",
                     "library_name": "transformers", "license": "apache-2.0", "tags": ["merge", "mergeforge"]}
    assert "two bases, stacked" in body
    assert f"| a | [org/base](https://huggingface.co/org/base) | `{'a' * 40}` (main) |" in body
    assert f"| b | [org/other](https://huggingface.co/org/other) | `{'b' * 40}` (v2) |" in body
    merge = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert merge == {"merge": r.merge} and "merge_method: `slerp`" in body
    assert "llama.cpp `llama.cpp-0c1e57098`" in body and "mergeforge 0.1.0" in body
    assert "## Rebuild" in body and HUB_RECIPE.strip() in body
    gguf = model_card(r, "gguf", files=["r-BF16-00001-of-00003.gguf", "r-BF16-00002-of-00003.gguf",
                                        "r-BF16-00003-of-00003.gguf", "r-Q8_0.gguf", "README.md"], **kwargs)
    front, body = front_matter(gguf)
    assert front["base_model"] == "org/m" and front["base_model_relation"] == "quantized"
    assert front["library_name"] == "gguf" and "gguf" in front["tags"]
    assert ("| `r-BF16.gguf` (3 parts: `r-BF16-00001-of-00003.gguf`, `r-BF16-00002-of-00003.gguf`, "
            "`r-BF16-00003-of-00003.gguf`) | unquantized | 5.1 MB | 16.0312 | – | – |") in body
    assert "| `r-Q8_0.gguf` | Q8_0 | 1.5 MB | 16.0441 | 0.00441 | 96.5 % |" in body
    assert "16 chunks of 256 tokens" in body
    assert model_card(r, "gguf", files=["r-Q8_0.gguf"], **kwargs) == model_card(r, "gguf", files=["r-Q8_0.gguf"],
                                                                                **kwargs)   # no date: idempotent


def test_a_card_of_a_local_merge_says_it_cannot_be_rebuilt_from_the_hub(tmp_path: Path, tiny_llama: Path) -> None:
    from steps.publish import model_card
    text = recipe_text(tiny_llama, "publish: {model: org/m}\n")
    r = load(tmp_path, text)
    card = model_card(r, "model", lock={}, scoreboard=None, llama_cpp=None, files=["config.json"], recipe_text=text,
                      mergeforge="0.1.0")
    front, body = front_matter(card)
    assert "base_model" not in front
    assert "Sources a are local directories" in body and str(tiny_llama) not in body


@pytest.mark.parametrize(("publish", "key", "needle"), [
    ("publish: {private: true}", "publish", "name a Hub repository"),
    ("publish: {model: org/m, gguf: org/m}", "publish.gguf", "repository of their own"),
    ("publish: {gguf: org/g, quants: [Q4_KM]}", "publish.quants[0]", "did you mean 'Q4_K_M'?"),
    ("publish: {model: 'not a repo'}", "publish.model", "expected a Hub repository id"),
    ("publish: {gguf: org/g, split_bytes: 1000}", "publish.split_bytes", "whole MB"),
    ("publish: {model: org/m, variant: healed}", "publish.variant", "needs a heal: block"),
    ("publish: {model: org/m, privat: true}", "publish.privat", "did you mean 'private'?"),
])
def test_publish_block_validation(tmp_path: Path, tiny_llama: Path, publish: str, key: str, needle: str) -> None:
    from steps.errors import RecipeError
    with pytest.raises(RecipeError) as err:
        load(tmp_path, recipe_text(tiny_llama, publish + "\n", "quantize: [Q4_K_M]\n"))
    assert err.value.key == key and needle in err.value.message, err.value


def test_publish_block_defaults(tmp_path: Path, tiny_llama: Path) -> None:
    r = load(tmp_path, recipe_text(tiny_llama, "publish: {gguf: org/g, quants: [q4_k_m]}\n", "quantize: [Q4_K_M]\n"))
    assert r.publish == {"gguf": "org/g", "quants": ["Q4_K_M"], "variant": "merged", "split_bytes": 50_000_000_000,
                         "private": True}


# ------------------------------------------------------------------------------------------------ the split

def write_gguf(path: Path, tensors: int, floats: int) -> None:
    import numpy as np
    from gguf import GGUFWriter
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("split test")
    for i in range(tensors):
        writer.add_tensor(f"blk.{i}.weight", np.full((floats,), i, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_above_the_limit_is_split_with_llama_gguf_split(tmp_path: Path, llama_cpp: Any) -> None:
    from gguf import GGUFReader

    from steps.publish import LocalFile, split
    source = tmp_path / "r-BF16.gguf"
    write_gguf(source, tensors=6, floats=150_000)                       # 6 tensors of 600 kB
    f = LocalFile("org/g", source.name, source, source.stat().st_size, "ab" * 32)
    parts = split(f, 1_000_000, tmp_path / "publish")
    assert [p.path_in_repo for p in parts] == [f"r-BF16-0000{i}-of-00006.gguf" for i in range(1, 7)]
    assert all(p.size <= 1_000_000 for p in parts) and all(p.repo == "org/g" for p in parts)
    names = [t.name for p in parts for t in GGUFReader(p.local).tensors]
    assert names == [f"blk.{i}.weight" for i in range(6)]
    mtime = parts[0].local.stat().st_mtime_ns
    assert split(f, 1_000_000, tmp_path / "publish") == parts           # kept: a resumed publish does not split again
    assert parts[0].local.stat().st_mtime_ns == mtime


# ---------------------------------------------------------------------------------------------- the transfer

LFS = (".safetensors", ".gguf", ".model")


class FakeHub:
    """Stands in for huggingface_hub.HfApi where no network can be had: the three calls the transfer makes, with
    the files of each repository kept as the Hub lists them (LFS sha256 for weights, git blob id for all)."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.private: dict[str, bool] = {}
        self.commits: list[list[str]] = []
        self.fail_at: int | None = None          # the commit number that loses its connection

    def list_repo_tree(self, repo_id: str, recursive: bool = False, **_: Any) -> list[Any]:
        import httpx2
        from huggingface_hub import RepoFile
        from huggingface_hub.errors import RepositoryNotFoundError
        if repo_id not in self.repos:
            url = f"https://huggingface.co/api/models/{repo_id}/tree/main"
            raise RepositoryNotFoundError("404", response=httpx2.Response(404, request=httpx2.Request("GET", url)))
        return [RepoFile(path=p, size=len(d), oid=hashlib.sha1(b"blob %d\0" % len(d) + d).hexdigest(),
                         lfs={"size": len(d), "oid": hashlib.sha256(d).hexdigest(), "pointerSize": 134}
                         if p.endswith(LFS) else None) for p, d in self.repos[repo_id].items()]

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False, **_: Any) -> None:
        self.repos.setdefault(repo_id, {})
        self.private[repo_id] = bool(private)

    def create_commit(self, repo_id: str, operations: list[Any], *, commit_message: str, **_: Any) -> None:
        import httpx2
        if self.fail_at is not None and len(self.commits) == self.fail_at:
            raise httpx2.ConnectError("connection reset")
        for op in operations:
            self.repos[repo_id][op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
        self.commits.append([op.path_in_repo for op in operations])


def built_workspace(ws: Workspace, model: Path, publish: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    from steps.recipe import load as load_recipe
    f = ws.write_recipe("r", recipe_text(model, publish))
    ws.doit("merge")
    for key, value in ws.env().items():
        if key.startswith("MERGEFORGE_"):
            monkeypatch.setenv(key, value)
    return load_recipe(f)


def test_publish_uploads_once_and_resumes(workspace: Workspace, tiny_llama: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from steps import publish
    from steps.errors import StepFailed
    r = built_workspace(workspace, tiny_llama, "publish: {model: org/m, private: false}\n", monkeypatch)
    monkeypatch.setattr(publish, "SMALL_FILE", 100_000)       # the tiny model's weights count as a large file
    hub = FakeHub()
    hub.fail_at = 1                                            # the connection drops after the first commit
    with pytest.raises(StepFailed, match="publish:r: uploading to org/m: cannot reach the Hub"):
        publish.publish(r, api=hub)
    assert hub.commits == [["model.safetensors"]] and hub.private == {"org/m": False}
    hub.fail_at = None
    lines = publish.publish(r, api=hub)                        # resumes: the weights are not uploaded again
    merged = workspace.build / "r" / "merged"
    card = workspace.build / "r" / "publish" / "model" / "README.md"
    files = {p.name: p for p in sorted(merged.iterdir())} | {"README.md": card}
    large = [[n] for n, p in files.items() if p.stat().st_size > 100_000 and n != "model.safetensors"]
    assert "  skip   model.safetensors" in lines
    assert hub.commits[1:] == [*large, [n for n, p in files.items() if p.stat().st_size <= 100_000]]
    assert hub.repos["org/m"] == {n: p.read_bytes() for n, p in files.items()}
    again = publish.publish(r, api=hub)                        # idempotent: nothing left to upload
    assert len(hub.commits) == 2 + len(large)
    assert f"publish: org/m (model): 0 to upload (0.0 MB), {len(files)} already there" in again


def test_dry_run_uploads_nothing(workspace: Workspace, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from steps import publish
    r = built_workspace(workspace, tiny_llama, "publish: {model: org/m}\n", monkeypatch)
    hub = FakeHub()
    lines = publish.publish(r, api=hub, dry_run=True)
    assert lines[0].startswith("publish: org/m (model): 6 to upload") and "  upload README.md" in lines
    assert hub.commits == [] and hub.repos == {}


def test_publish_is_a_doit_task_never_run_by_default(workspace: Workspace, tiny_llama: Path) -> None:
    """`doit publish:r` builds what it uploads first, then fails in one line when the Hub cannot be reached; the
    default task list has no publish."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workspace.write_recipe("r", recipe_text(tiny_llama, "publish: {model: org/m}\n"))
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0"}
    result = workspace.doit("publish:r", check=False, env=env)
    assert result.returncode != 0 and "merge:r" in result.executed, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("mergeforge: ")]
    assert errors == ["mergeforge: publish:r: listing org/m: cannot reach the Hub (ConnectError); connect and run it "
                      "again (files already uploaded are skipped)"], result.output
    assert "Traceback" not in result.output
    listed = workspace.doit("list", "--all").output
    assert "publish:r" in listed
    code = "import dodo; print(' '.join(dodo.DOIT_CONFIG['default_tasks']))"
    defaults = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=workspace.env(), capture_output=True,
                              text=True, check=True).stdout.split()
    assert "publish" not in defaults and "merge" in defaults


def test_the_card_and_plan_carry_no_token(workspace: Workspace, tiny_llama: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from steps import publish
    token = "hf_" + os.urandom(12).hex()
    monkeypatch.setenv("HF_TOKEN", token)
    r = built_workspace(workspace, tiny_llama, "publish: {model: org/m}\n", monkeypatch)
    hub = FakeHub()
    lines = publish.publish(r, api=hub)
    assert token not in "\n".join(lines)
    assert all(token.encode() not in data for data in hub.repos["org/m"].values())
    assert all(token.encode() not in p.read_bytes() for p in (workspace.build / "r").rglob("*") if p.is_file())


def test_a_card_of_a_healed_merge_gives_its_heal_and_loss(tmp_path: Path, tiny_llama: Path) -> None:
    from steps.publish import model_card
    heal = (f"heal:\n  quantization: none\n  data:\n    - {{text: {tiny_llama / 'tokenizer_config.json'}}}\n")
    text = recipe_text(tiny_llama, "publish: {model: org/m}\n" + heal)
    r = load(tmp_path, text)
    card = model_card(r, "model", lock={}, scoreboard=None, llama_cpp=None, files=["config.json"], recipe_text=text,
                      mergeforge="0.1.0", heal={"first_loss": 3.0586, "last_loss": 2.9536, "steps": 16,
                                                "tokens_trained": 65536})
    _, body = front_matter(card)
    assert "## Heal" in body and "quantization: none" in body
    assert "Loss 3.0586 → 2.9536 over 16 steps (65536 tokens)." in body
