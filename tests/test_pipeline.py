"""The pipeline end to end on a tiny model built in code: doit task states, the store, early cutoff, kill -9."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DATA, ROOT, Workspace, generate, llama_cpp_with_quantize

pytestmark = pytest.mark.slow

ALL_STAGES = ["fetch:tiny", "merge:tiny", "convert:tiny", "imatrix:tiny", "quantize:tiny-Q4_K_M",
              "quantize:tiny-Q8_0", "bench:tiny", "bench:tiny-Q4_K_M", "bench:tiny-Q8_0", "scoreboard:tiny"]


def tiny_recipe(model: Path, quants: str = "[Q4_K_M, Q8_0]", chunks: int = 4) -> str:
    return f"""
sources:
  a: {{path: {model}}}
merge:
  merge_method: passthrough
  dtype: bfloat16
  slices:
    - sources: [{{model: a, layer_range: [0, 3]}}]
    - sources: [{{model: a, layer_range: [1, 4]}}]
imatrix: {{calibration: {DATA / 'calibration.txt'}, chunks: {chunks}, context: 64}}
quantize: {quants}
bench: {{heldout: {DATA / 'heldout.txt'}, chunks: 4, context: 64}}
"""


@pytest.fixture
def built(workspace: Workspace, tiny_llama: Path, llama_cpp) -> Workspace:  # type: ignore[no-untyped-def]
    workspace.write_recipe("tiny", tiny_recipe(tiny_llama))
    first = workspace.doit()
    assert first.executed == ALL_STAGES
    return workspace


def built_events(ws: Workspace) -> list[str]:
    return [str(e["stage"]) for e in ws.events("tiny") if e["action"] == "built"]


def test_first_build_makes_every_artifact(built: Workspace, llama_cpp) -> None:  # type: ignore[no-untyped-def]
    out = built.build / "tiny"
    board = json.loads((out / "scoreboard.json").read_text())
    assert board["schema"] == 4 and board["variants"] == ["tiny"]
    rows = {row["type"]: row for row in board["models"]}
    assert set(rows) == {"base", "Q4_K_M", "Q8_0"}
    for qtype in ("Q4_K_M", "Q8_0"):
        assert rows[qtype]["ppl"] > 1 and rows[qtype]["kld_mean"] > 0
        assert rows[qtype]["size"] == (out / f"tiny-{qtype}.gguf").stat().st_size
    assert rows["Q8_0"]["kld_mean"] < rows["Q4_K_M"]["kld_mean"]
    # the quant loads in llama.cpp and generates
    text = generate(llama_cpp.program("llama-completion"), out / "tiny-Q4_K_M.gguf", "def", n=8)
    assert text.lstrip().startswith("def") and len(text.strip()) > len("def"), text
    # provenance metadata travels from the BF16 GGUF into the quants
    from steps.convert import read_metadata
    meta = read_metadata(out / "tiny-Q4_K_M.gguf", ("mergeforge.recipe", "mergeforge.convert.key",
                                                      "mergeforge.sources"))
    key = json.loads((out / ".mf" / "convert.tiny.key").read_text())["key"]
    assert meta["mergeforge.recipe"] == "tiny" and meta["mergeforge.convert.key"] == key
    assert json.loads(meta["mergeforge.sources"])["a"]["kind"] == "path"


def test_second_run_executes_nothing(built: Workspace) -> None:
    again = built.doit()
    assert again.executed == []
    assert set(ALL_STAGES) <= set(again.uptodate)


def test_touching_sources_and_artifacts_executes_nothing(built: Workspace, tiny_llama: Path) -> None:
    for root in (tiny_llama, built.build / "tiny", DATA):
        for path in root.rglob("*"):
            if path.is_file():
                os.utime(path)
    again = built.doit()
    assert again.executed == []


def test_new_quant_type_runs_only_that_quant_and_the_scoreboard(built: Workspace, tiny_llama: Path) -> None:
    built.write_recipe("tiny", tiny_recipe(tiny_llama, quants="[Q4_K_M, Q8_0, Q5_K_M]"))
    again = built.doit()
    assert again.executed == ["quantize:tiny-Q5_K_M", "bench:tiny-Q5_K_M", "scoreboard:tiny"]
    rows = json.loads((built.build / "tiny" / "scoreboard.json").read_text())["models"]
    assert [r["type"] for r in rows] == ["base", "Q4_K_M", "Q8_0", "Q5_K_M"]


def test_imatrix_change_then_revert_restores_from_store(built: Workspace, tiny_llama: Path) -> None:
    before = json.loads((built.build / "tiny" / "lock.json").read_text())["artifacts"]
    built.write_recipe("tiny", tiny_recipe(tiny_llama, chunks=2))
    changed = built.doit()
    assert changed.executed == ["imatrix:tiny", "quantize:tiny-Q4_K_M", "quantize:tiny-Q8_0",
                                "bench:tiny-Q4_K_M", "bench:tiny-Q8_0", "scoreboard:tiny"]
    entries = built.store_entries()
    n_built = len(built_events(built))
    built.write_recipe("tiny", tiny_recipe(tiny_llama, chunks=4))
    reverted = built.doit()
    assert reverted.executed == ["imatrix:tiny", "quantize:tiny-Q4_K_M", "quantize:tiny-Q8_0",
                                 "bench:tiny-Q4_K_M", "bench:tiny-Q8_0", "scoreboard:tiny"]
    assert len(built_events(built)) == n_built, "a reverted change must restore, not rebuild"
    assert built.store_entries() == entries
    assert "imatrix tiny:" not in reverted.output and "quantize tiny-" not in reverted.output  # no llama.cpp ran
    after = json.loads((built.build / "tiny" / "lock.json").read_text())["artifacts"]
    assert after == before


def test_identical_bytes_keep_downstream_up_to_date(built: Workspace, tiny_llama: Path) -> None:
    """Early cutoff: the fetch stage reruns (its source moved) but finds the same bytes."""
    copy = built.path / "copy-of-tiny"
    shutil.copytree(tiny_llama, copy)
    built.write_recipe("tiny", tiny_recipe(copy))
    again = built.doit()
    assert again.executed == ["fetch:tiny"]
    assert "merge:tiny" in again.uptodate and "scoreboard:tiny" in again.uptodate


def test_source_edit_rebuilds_downstream(built: Workspace, tiny_llama: Path) -> None:
    copy = built.path / "edited"
    shutil.copytree(tiny_llama, copy)
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(config))
    built.write_recipe("tiny", tiny_recipe(copy))
    again = built.doit()
    assert again.executed == ALL_STAGES


def test_lock_file_and_reproducible_digests(built: Workspace, tiny_llama: Path, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    lock = json.loads((built.build / "tiny" / "lock.json").read_text())
    assert lock["sources"]["a"]["kind"] == "path" and len(lock["sources"]["a"]["revision"]) == 64
    assert {"merged/model.safetensors", "tiny-BF16.gguf", "tiny-imatrix.gguf", "tiny-Q4_K_M.gguf",
            "tiny-Q8_0.gguf", "scoreboard.json"} <= set(lock["artifacts"])
    for rel, info in lock["artifacts"].items():
        path = built.build / "tiny" / rel
        assert path.stat().st_size == info["size"]
    from steps.hashing import _hash_file
    assert _hash_file(built.build / "tiny" / "tiny-Q4_K_M.gguf") == lock["artifacts"]["tiny-Q4_K_M.gguf"]["digest"]
    # a second clean build, with its own store, gives the same bytes
    other = Workspace(tmp_path_factory.mktemp("clean2"))
    other.write_recipe("tiny", tiny_recipe(tiny_llama))
    other.doit()
    lock2 = json.loads((other.build / "tiny" / "lock.json").read_text())
    assert {k: v["digest"] for k, v in lock2["artifacts"].items()} == \
           {k: v["digest"] for k, v in lock["artifacts"].items()}
    assert lock2["stages"] == lock["stages"]


def test_kill_during_quantize_resumes_without_redoing(workspace: Workspace, tiny_llama: Path, llama_cpp,  # type: ignore[no-untyped-def]
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    workspace.write_recipe("tiny", tiny_recipe(tiny_llama))
    # A llama.cpp directory (MERGEFORGE_LLAMA_CPP) whose llama-quantize is slow, so the kill lands inside it;
    # the resumed run uses one without the delay (same tool version, so the same stage keys).
    slow = llama_cpp_with_quantize(workspace.path / "slow-llama.cpp", llama_cpp, '"$REAL" "$@" && sleep 60')
    fast = llama_cpp_with_quantize(workspace.path / "llama.cpp", llama_cpp, 'exec "$REAL" "$@"')
    monkeypatch.setenv("MERGEFORGE_LLAMA_CPP", str(slow))
    env = workspace.env()
    proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py")], cwd=workspace.path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    tmp = workspace.store / "tmp"
    while time.time() < deadline:
        if any(tmp.glob("quantize.*/out/*.gguf")):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("quantize never started")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for gguf in (workspace.build / "tiny").glob("*.gguf"):
        lock_digest = json.loads((workspace.build / "tiny" / ".mf" / (
            "convert.tiny.json" if "BF16" in gguf.name else "imatrix.tiny.json" if "imatrix" in gguf.name
            else f"quantize.tiny-{gguf.stem.split('-', 1)[1]}.json")).read_text())["outputs"][gguf.name]["digest"]
        from steps.hashing import _hash_file
        assert _hash_file(gguf) == lock_digest, f"{gguf} in build/ is not a complete artifact"
    finished = built_events(workspace)
    assert finished[:4] == ["fetch:tiny", "merge:tiny", "convert:tiny", "imatrix:tiny"]
    monkeypatch.setenv("MERGEFORGE_LLAMA_CPP", str(fast))
    resumed = workspace.doit()
    rebuilt = built_events(workspace)[len(finished):]
    assert not set(rebuilt) & set(finished), f"finished stages were rebuilt: {rebuilt}"
    assert "quantize:tiny-Q4_K_M" in rebuilt and "bench:tiny-Q4_K_M" in rebuilt
    assert (workspace.build / "tiny" / "scoreboard.json").exists()
    assert "fetch:tiny" in resumed.executed  # doit lost its state: the stage ran, and restored from the store


def test_scoreboard_agrees_with_llama_cpps_own_kl_divergence(built: Workspace, llama_cpp) -> None:  # type: ignore[no-untyped-def]
    """PPL and KLD computed from the saved log-probabilities match what llama-perplexity's --kl-divergence prints."""
    out = built.build / "tiny"
    rows = {r["type"]: r for r in json.loads((out / "scoreboard.json").read_text())["models"]}
    base = built.path / "base.kld"
    common = ["-f", str(DATA / "heldout.txt"), "-c", "64", "--chunks", "4", "-t", "2"]
    subprocess.run([llama_cpp.program("llama-perplexity"), "-m", str(out / "tiny-BF16.gguf"), *common,
                    "--kl-divergence-base", str(base)], check=True, capture_output=True)
    from steps.bench import parse_llama_report
    for _ in range(10):   # this llama.cpp version can lose its final log lines at exit: run again until printed
        proc = subprocess.run([llama_cpp.program("llama-perplexity"), "-m", str(out / "tiny-Q4_K_M.gguf"), *common,
                               "--kl-divergence-base", str(base), "--kl-divergence"], capture_output=True, text=True)
        report = parse_llama_report(proc.stdout + proc.stderr)
        if {"kld_mean", "ppl_q", "ppl_base"} <= set(report):
            break
    else:
        pytest.fail("llama-perplexity never printed its KL-divergence report")
    q4 = rows["Q4_K_M"]
    assert q4["kld_mean"] == pytest.approx(report["kld_mean"], rel=0.02, abs=2e-5)
    assert q4["ppl"] == pytest.approx(report["ppl_q"], rel=1e-3)
    assert rows["base"]["ppl"] == pytest.approx(report["ppl_base"], rel=1e-3)
    assert q4["same_top_p_percent"] == pytest.approx(report["same_top_p"], abs=0.01)
