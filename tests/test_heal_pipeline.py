"""The heal through doit: the healed model is a second variant with its own convert, quants and bench; editing the
heal reruns only the heal and that variant; a kill -9 of doit's process tree resumes from the last checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DATA, ROOT, Workspace

pytestmark = pytest.mark.slow

RAW = ["convert:tiny", "quantize:tiny-Q8_0", "bench:tiny", "bench:tiny-Q8_0"]
HEALED = ["heal:tiny", "convert:tiny-healed", "quantize:tiny-healed-Q8_0", "bench:tiny-healed",
          "bench:tiny-healed-Q8_0"]


def heal_recipe(model: Path, max_steps: int = 12, weights: tuple[float, float] = (0.7, 0.3), comment: str = "") -> str:
    return f"""{comment}
sources:
  a: {{path: {model}}}
merge:
  merge_method: passthrough
  slices:
    - sources: [{{model: a, layer_range: [0, 3]}}]
    - sources: [{{model: a, layer_range: [1, 4]}}]
quantize: [Q8_0]
heal:
  quantization: none
  compute_dtype: float32
  lora: {{r: 4, alpha: 8, dropout: 0.0}}
  train: {{learning_rate: 1.0e-3, warmup_steps: 1, batch_size: 2, grad_accum: 1, max_steps: {max_steps},
          max_length: 64, save_steps: 4, logging_steps: 2, seed: 0}}
  data:
    - {{text: {DATA / 'calibration.txt'}, weight: {weights[0]}}}
    - {{text: {DATA / 'README.md'}, weight: {weights[1]}}}
bench: {{heldout: {DATA / 'heldout.txt'}, chunks: 2, context: 64}}
"""


@pytest.fixture
def healed_ws(workspace: Workspace, tiny_llama: Path, llama_cpp) -> Workspace:  # type: ignore[no-untyped-def]
    workspace.write_recipe("tiny", heal_recipe(tiny_llama))
    first = workspace.doit()
    assert set(RAW + HEALED) <= set(first.executed), first.executed
    return workspace


def test_healed_variant_side_by_side(healed_ws: Workspace) -> None:
    out = healed_ws.build / "tiny"
    board = json.loads((out / "scoreboard.json").read_text())
    assert board["variants"] == ["tiny", "tiny-healed"]
    rows = {(r["variant"], r["type"]) for r in board["models"]}
    assert rows == {("tiny", "base"), ("tiny", "Q8_0"), ("tiny-healed", "base"), ("tiny-healed", "Q8_0")}
    assert "| Figure | raw merge | healed | Delta |" in (out / "scoreboard.md").read_text()
    losses = json.loads((out / "loss.json").read_text())
    assert losses[-1]["loss"] < losses[0]["loss"]
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "tiny-healed-Q8_0.gguf").exists()


@pytest.mark.parametrize("edit", ["max_steps", "weight"])
def test_editing_the_heal_reruns_only_the_healed_variant(healed_ws: Workspace, tiny_llama: Path, edit: str) -> None:
    changed = heal_recipe(tiny_llama, max_steps=10) if edit == "max_steps" else \
        heal_recipe(tiny_llama, weights=(0.5, 0.5))
    healed_ws.write_recipe("tiny", changed)
    again = healed_ws.doit()
    assert set(HEALED) <= set(again.executed), again.executed
    assert not set(again.executed) & set(RAW + ["fetch:tiny", "merge:tiny"]), again.executed
    built = [e["stage"] for e in healed_ws.events("tiny")[-len(again.executed):] if e["action"] == "built"]
    assert "heal:tiny" in built and not set(built) & set(RAW)


def test_a_comment_edit_reruns_nothing(healed_ws: Workspace, tiny_llama: Path) -> None:
    healed_ws.write_recipe("tiny", heal_recipe(tiny_llama, comment="# a comment about the heal"))
    assert healed_ws.doit().executed == []


def test_kill_9_of_doit_during_the_heal_resumes(workspace: Workspace, tiny_llama: Path, tmp_path_factory,  # type: ignore[no-untyped-def]
                                                llama_cpp) -> None:
    """doit's whole process tree is killed once a checkpoint exists; the next `doit heal` resumes from it and the
    adapter equals an uninterrupted run's."""
    workspace.write_recipe("tiny", heal_recipe(tiny_llama, max_steps=40))
    proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "heal"], cwd=workspace.path,
                            env=workspace.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((workspace.store / "work").glob("heal.*/checkpoints/checkpoint-8/*")):
        assert proc.poll() is None, "doit ended before the heal reached a checkpoint"
        time.sleep(0.1)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (workspace.build / "tiny" / "adapter").exists()
    workspace.doit("heal")
    record = json.loads((workspace.build / "tiny" / ".mf" / "heal.tiny.json").read_text())["heal"]
    assert record["resumed_from"] >= 8 and record["steps"] == 40, record
    other = Workspace(tmp_path_factory.mktemp("uninterrupted"))
    other.write_recipe("tiny", heal_recipe(tiny_llama, max_steps=40))
    other.doit("heal")
    for rel in ("adapter/adapter_model.safetensors", "healed/model.safetensors"):
        assert (workspace.build / "tiny" / rel).read_bytes() == (other.build / "tiny" / rel).read_bytes(), rel


def test_a_heal_run_as_a_submitit_job_gives_the_same_weights(healed_ws: Workspace, tiny_llama: Path,
                                                              tmp_path: Path) -> None:
    """MERGEFORGE_CLUSTER=local: the heal is a submitit job (a process of its own, with a workspace of its own)
    that pulls the merge from the remote store, heals, and pushes; the checkout's doit waits, shows the job's log,
    pulls the healed model, and it is the in-process heal's byte for byte. A job on another device than the key
    names fails in one line."""
    from test_faults import blake3_of
    other = Workspace(tmp_path / "elsewhere")
    other.path.mkdir()
    other.write_recipe("tiny", heal_recipe(tiny_llama))
    env = {"MERGEFORGE_REMOTE": (tmp_path / "remote").as_uri(), "MERGEFORGE_CLUSTER": "local",
           "MERGEFORGE_CLUSTER_DIR": str(tmp_path / "jobs")}
    done = other.doit("heal", env=env)
    assert done.executed == ["fetch:tiny", "merge:tiny", "heal:tiny"], done.output
    heal = next(e for e in other.events("tiny") if e["stage"] == "heal:tiny")
    assert heal["action"] == "built" and str(heal["job"]).startswith("local ")
    assert "submitted as local job" in done.output and "[job " in done.output and "heal:tiny: step " in done.output
    for rel in ("healed/model.safetensors", "adapter/adapter_model.safetensors"):
        assert blake3_of(other.build / "tiny" / rel) == blake3_of(healed_ws.build / "tiny" / rel), rel
    assert list((tmp_path / "jobs").glob("heal.*/workspace/store/store/*/*/manifest.json"))   # built in the job

    other.write_recipe("tiny", heal_recipe(tiny_llama, max_steps=6))
    failed = other.doit("heal", env={**env, "MERGEFORGE_CLUSTER_DEVICE": "cuda"}, check=False)
    lines = [line for line in failed.output.splitlines() if line.startswith("mergeforge: ")]
    assert failed.returncode != 0 and len(lines) == 1, failed.output
    assert "heal:tiny: local job" in lines[0] and "failed: " in lines[0] and "the job computes key" in lines[0] \
        and "its log is" in lines[0], lines
