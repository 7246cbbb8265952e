"""convert and quantize against llama.cpp: load checks, per-tensor quant options, reproducibility across checkouts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import DATA, Workspace, assert_nothing_half_written, llama_cpp_with_quantize

pytestmark = pytest.mark.slow


def recipe(model: Path, data: Path = DATA, quants: str = "[Q4_K_M]") -> str:
    return f"""
sources:
  a: {{path: {model}}}
merge:
  merge_method: passthrough
  slices:
    - sources: [{{model: a, layer_range: [0, 3]}}]
    - sources: [{{model: a, layer_range: [1, 4]}}]
imatrix: {{calibration: {data / 'calibration.txt'}, chunks: 2, context: 64}}
quantize: {quants}
bench: {{heldout: {data / 'heldout.txt'}, chunks: 2, context: 64}}
"""


def test_two_checkouts_at_different_paths_give_identical_bytes(tmp_path: Path, tiny_llama: Path,
                                                               llama_cpp) -> None:  # type: ignore[no-untyped-def]
    """Two checkouts at different depths, each with its own copy of the texts and its own store: every artifact,
    the imatrix and the quants included, has the same digest (no path of either checkout reaches a file)."""
    locks = []
    for where in (tmp_path / "one", tmp_path / "two" / "deeper" / "still"):
        ws = Workspace(where)
        data = where / "recipes" / "data"
        data.mkdir(parents=True)
        for name in ("calibration.txt", "heldout.txt"):
            shutil.copyfile(DATA / name, data / name)
        ws.write_recipe("tiny", recipe(tiny_llama, data))
        ws.doit()
        locks.append(json.loads((ws.build / "tiny" / "lock.json").read_text()))
        from steps.convert import read_metadata
        meta = read_metadata(ws.build / "tiny" / "tiny-Q4_K_M.gguf", ("quantize.imatrix.dataset",
                                                                      "quantize.imatrix.file"))
        assert str(where) not in json.dumps(meta, default=str), meta
    one, two = ({k: v["digest"] for k, v in lock["artifacts"].items()} for lock in locks)
    assert {"tiny-imatrix.gguf", "tiny-Q4_K_M.gguf", "tiny-BF16.gguf", "scoreboard.json"} <= set(one)
    assert one == two


def test_a_gguf_llama_cpp_cannot_load_fails_convert(workspace: Workspace, tiny_llama: Path,
                                                    llama_cpp) -> None:  # type: ignore[no-untyped-def]
    """A config that disagrees with its tensors (one KV head declared, two stored): the converter writes a file,
    llama.cpp refuses it, and the stage fails with llama.cpp's reason; nothing reaches build/ or the store."""
    model = workspace.path / "model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config["num_key_value_heads"] = 1
    (model / "config.json").write_text(json.dumps(config))
    workspace.write_recipe("tiny", recipe(model))
    result = workspace.doit("convert", check=False)
    assert result.returncode != 0 and "Traceback" not in result.output
    (line,) = {x for x in result.output.splitlines() if x.startswith("mergeforge: ")}
    assert "llama.cpp cannot load tiny-BF16.gguf" in line and "attn_k" in line, line
    assert not list((workspace.build / "tiny").glob("*.gguf"))
    assert not any(e["stage"] == "convert:tiny" for e in workspace.events("tiny"))
    assert_nothing_half_written(workspace)


def test_a_quant_llama_cpp_cannot_load_fails_quantize(workspace: Workspace, tiny_llama: Path,
                                                      llama_cpp) -> None:  # type: ignore[no-untyped-def]
    broken = llama_cpp_with_quantize(workspace.path / "llama.cpp", llama_cpp,
                                     '"$REAL" "$@" || exit 1\nfor a in "$@"; do case "$a" in */out/*.gguf) '
                                     'truncate -s 100000 "$a";; esac; done')
    workspace.write_recipe("tiny", recipe(tiny_llama))
    result = workspace.doit("quantize", check=False, env={"MERGEFORGE_LLAMA_CPP": str(broken)})
    assert result.returncode != 0 and "Traceback" not in result.output
    (line,) = {x for x in result.output.splitlines() if x.startswith("mergeforge: ")}
    assert "llama.cpp cannot load tiny-Q4_K_M.gguf" in line, line
    assert not (workspace.build / "tiny" / "tiny-Q4_K_M.gguf").exists()
    assert (workspace.build / "tiny" / "tiny-BF16.gguf").exists()
    assert_nothing_half_written(workspace)


def test_quant_entries_with_per_tensor_types(workspace: Workspace, tiny_llama: Path,
                                             llama_cpp) -> None:  # type: ignore[no-untyped-def]
    """A bartowski-style _L variant is one recipe line: Q4_K_M with the output and embedding tensors in Q8_0."""
    from gguf import GGMLQuantizationType, GGUFReader
    workspace.write_recipe("tiny", recipe(tiny_llama, quants="""
  - Q4_K_M
  - {name: Q4_K_L, type: Q4_K_M, output_tensor_type: q8_0, token_embedding_type: q8_0,
     tensor_type: ["attn_v=q6_k"], override_kv: ["general.name=str:tiny merge"]}"""))
    workspace.doit("quantize")
    out = workspace.build / "tiny"
    plain = {t.name: t.tensor_type for t in GGUFReader(out / "tiny-Q4_K_M.gguf").tensors}
    reader = GGUFReader(out / "tiny-Q4_K_L.gguf")
    large = {t.name: t.tensor_type for t in reader.tensors}
    assert large["output.weight"] == large["token_embd.weight"] == GGMLQuantizationType.Q8_0
    assert plain["output.weight"] != GGMLQuantizationType.Q8_0
    assert all(large[f"blk.{i}.attn_v.weight"] == GGMLQuantizationType.Q6_K for i in range(6))
    assert large["blk.0.ffn_up.weight"] == plain["blk.0.ffn_up.weight"]
    name = reader.get_field("general.name")
    assert name is not None and name.contents() == "tiny merge"


def test_large_ggufs_are_split_and_used_in_parts(workspace: Workspace, tiny_llama: Path,
                                                 llama_cpp) -> None:  # type: ignore[no-untyped-def]
    """gguf.split_max_size: the BF16 GGUF and every quant above it are split with llama-gguf-split; imatrix,
    quantize and bench read the parts; a second run executes nothing."""
    workspace.write_recipe("tiny", recipe(tiny_llama, quants="[Q8_0, Q2_K]") + "gguf: {split_max_size: 2M}\n")
    workspace.doit()
    out = workspace.build / "tiny"
    bf16 = sorted(p.name for p in out.glob("tiny-BF16-*-of-*.gguf"))
    q8 = sorted(p.name for p in out.glob("tiny-Q8_0-*-of-*.gguf"))
    assert len(bf16) >= 3 and len(q8) >= 2, (bf16, q8)
    assert not (out / "tiny-BF16.gguf").exists() and not (out / "tiny-Q8_0.gguf").exists()
    assert (out / "tiny-Q2_K.gguf").stat().st_size < 2 << 20          # under the limit: one file
    rows = {r["type"]: r for r in json.loads((out / "scoreboard.json").read_text())["models"]}
    assert rows["base"]["file"] == bf16[0] and rows["Q8_0"]["file"] == q8[0]
    assert rows["Q8_0"]["size"] == sum((out / n).stat().st_size for n in q8)
    assert rows["Q8_0"]["kld_mean"] < rows["Q2_K"]["kld_mean"]
    lock = json.loads((out / "lock.json").read_text())["artifacts"]
    assert set(bf16) | set(q8) <= set(lock)
    assert workspace.doit().executed == []
