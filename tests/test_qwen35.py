"""The seed's architecture all the way: tiny Qwen3.5 checkpoints with the real Qwen3.5 tokenizer (tests/qwen35.py),
stacked A + B, through convert (MTP, vision projector), imatrix and quantize, loaded and compared in llama.cpp."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import DATA, Workspace, assert_nothing_half_written
from qwen35 import compare_with_llama_cpp, gguf_info, make_qwen35

pytestmark = pytest.mark.slow


def recipe(a: Path, b: Path, extra: str = "", quants: str = "[Q4_K_M]", calibration: bool = True) -> str:
    text = f"""
sources:
  a: {{path: {a}}}
  b: {{path: {b}}}
merge:
  merge_method: passthrough
  base_model: a
  slices:
    - sources: [{{model: a, layer_range: [0, 4]}}]
    - sources: [{{model: b, layer_range: [0, 4]}}]
quantize: {quants}
"""
    if calibration:
        text += f"imatrix: {{calibration: {DATA / 'calibration.txt'}, chunks: 2, context: 64}}\n"
    return text + extra


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("qwen35")
    return (make_qwen35(root / "a", 1, logit_scale=50), make_qwen35(root / "b", 2, logit_scale=50))


@pytest.fixture(scope="module")
def stacked(tmp_path_factory: pytest.TempPathFactory, pair: tuple[Path, Path], llama_cpp) -> Workspace:  # type: ignore[no-untyped-def]
    ws = Workspace(tmp_path_factory.mktemp("qwen-ws"))
    ws.write_recipe("qwen", recipe(*pair))
    ws.doit()
    return ws


def test_stacked_pair_converts_quantizes_and_keeps_its_eyes(stacked: Workspace, llama_cpp) -> None:  # type: ignore[no-untyped-def]
    out = stacked.build / "qwen"
    names = {p.name for p in out.glob("*.gguf")}
    assert names == {"qwen-BF16.gguf", "qwen-mmproj-F16.gguf", "qwen-imatrix.gguf", "qwen-Q4_K_M.gguf"}
    for gguf in ("qwen-BF16.gguf", "qwen-Q4_K_M.gguf"):
        info = gguf_info(out / gguf)
        assert info["general.architecture"] == "qwen35" and info["tokenizer.ggml.pre"] == "qwen35"
        # 8 stacked layers + the complete MTP block of the base, converted
        assert info["qwen35.block_count"] == 9 and info["qwen35.nextn_predict_layers"] == 1
        assert "blk.8.nextn.eh_proj.weight" in info["tensors"]
        # the hybrid pattern: every 4th layer full attention, the others Gated DeltaNet (recurrent state)
        full = {int(n.split(".")[1]) for n in info["tensors"] if n.endswith("attn_q.weight")}
        linear = {int(n.split(".")[1]) for n in info["tensors"] if n.endswith("ssm_conv1d.weight")}
        assert full == {3, 7, 8} and linear == {0, 1, 2, 4, 5, 6}, (full, linear)
        assert list(info["qwen35.attention.recurrent_layers"])[:8] == [True, True, True, False] * 2
    proj = gguf_info(out / "qwen-mmproj-F16.gguf")
    assert proj["general.architecture"] == "clip" and proj["clip.projector_type"] == "qwen3vl_merger"
    record = json.loads((out / ".mf" / "convert.qwen.json").read_text())
    assert record["mtp"] == {"mode": "auto", "kept": True, "layers": 1} and record["mmproj"] == "qwen-mmproj-F16.gguf"
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert merged["text_config"]["num_hidden_layers"] == 8 and merged["vision_config"]["depth"] == 2
    assert (out / "merged" / "preprocessor_config.json").exists()
    # llama.cpp: the recurrent state covers the linear-attention layers only
    for gguf in ("qwen-BF16.gguf", "qwen-Q4_K_M.gguf"):
        proc = subprocess.run([llama_cpp.program("llama-completion"), "-m", str(out / gguf), "-p", "Hi", "-n", "1",
                               "-no-cnv", "-t", "2", "-c", "256", "-lv", "4"], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        log = " ".join((proc.stdout + proc.stderr).split())
        # 8 layers run (the MTP block is a draft head); the attention KV cache holds the 2 full-attention layers
        assert "print_info: n_layer = 8" in log, log[-3000:]
        assert re.search(r"llama_kv_cache: size = [0-9.]+ MiB \( 256 cells, 2 layers", log), log[-3000:]


def test_llama_cpp_agrees_with_transformers_on_the_merge(stacked: Workspace, tmp_path: Path) -> None:
    """llama.cpp on the BF16 GGUF against transformers (float32) on the merged safetensors, over the positions
    llama-perplexity scores. Measured: KLD ~1e-4, top-1 agreement ~99 %; the gap is llama.cpp's BF16 matmuls
    rounding activations to bf16."""
    out = stacked.build / "qwen"
    found = compare_with_llama_cpp(out / "qwen-BF16.gguf", out / "merged", DATA / "heldout.txt", 128, 2, tmp_path)
    print(json.dumps(found))
    assert found["kld_mean"] < 1e-3 and found["top1"] >= 0.97, found


@pytest.mark.parametrize("variant", ["none", "partial", "text_only"])
def test_incomplete_mtp_is_left_out_and_loads(variant: str, tmp_path_factory: pytest.TempPathFactory,
                                             llama_cpp) -> None:  # type: ignore[no-untyped-def]
    """As transformers saves it (no mtp.* but mtp_num_hidden_layers: 1), a partial MTP set, and a text-only
    Qwen3_5ForCausalLM without MTP: converted without MTP (auto), saying so, and the GGUF loads (the stage's own
    load check) with the stacked depth only."""
    root = tmp_path_factory.mktemp(f"qwen-{variant}")
    kw = {"text_only": True, "mtp": "none"} if variant == "text_only" else {"mtp": variant, "vision": False}
    a, b = make_qwen35(root / "a", 1, **kw), make_qwen35(root / "b", 2, **kw)  # type: ignore[arg-type]
    ws = Workspace(root / "ws")
    ws.write_recipe("qwen", recipe(a, b, calibration=False, quants="[Q8_0]"))
    result = ws.doit("quantize")
    assert "converting without MTP (--no-mtp; gguf.mtp: auto)" in result.output
    out = ws.build / "qwen"
    info = gguf_info(out / "qwen-BF16.gguf")
    assert info["qwen35.block_count"] == 8 and "qwen35.nextn_predict_layers" not in info
    assert not any(".nextn." in n for n in info["tensors"])
    assert (out / "qwen-Q8_0.gguf").exists() and not (out / "qwen-mmproj-F16.gguf").exists()
    record = json.loads((out / ".mf" / "convert.qwen.json").read_text())["mtp"]
    assert record["kept"] is False and ("no mtp.*" in record["reason"] or "partial" in record["reason"])


def test_keep_refuses_an_incomplete_mtp_set(tmp_path_factory: pytest.TempPathFactory, llama_cpp) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("qwen-keep")
    a, b = (make_qwen35(root / n, i, mtp="partial", vision=False) for i, n in enumerate("ab"))
    ws = Workspace(root / "ws")
    ws.write_recipe("qwen", recipe(a, b, "gguf: {mtp: keep}\n", calibration=False))
    result = ws.doit("convert", check=False)
    assert result.returncode != 0 and "Traceback" not in result.output
    (line,) = {x for x in result.output.splitlines() if x.startswith("mergeforge: ")}
    assert "gguf.mtp: keep asks for the MTP head, but its MTP set is partial" in line
    assert "missing mtp.layers.0." in line and "set gguf.mtp: drop" in line
    assert not list((ws.build / "qwen").glob("*.gguf"))
    assert_nothing_half_written(ws)


def test_drop_and_mmproj_off(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory,
                             llama_cpp) -> None:  # type: ignore[no-untyped-def]
    ws = Workspace(tmp_path_factory.mktemp("qwen-drop"))
    ws.write_recipe("qwen", recipe(*pair, "gguf: {mtp: drop, mmproj: off}\n", calibration=False))
    ws.doit("convert")
    out = ws.build / "qwen"
    assert {p.name for p in out.glob("*.gguf")} == {"qwen-BF16.gguf"}
    info = gguf_info(out / "qwen-BF16.gguf")
    assert info["qwen35.block_count"] == 8
