"""Recipe validation: each bad recipe fails before any work, naming the file, the key and the fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import DATA, Workspace
from steps.errors import RecipeError
from steps.recipe import load


def recipe(model: Path, **overrides: str) -> str:
    parts = {
        "sources": f"sources:\n  a: {{path: {model}}}\n",
        "merge": "merge:\n  merge_method: passthrough\n  slices:\n"
                 "    - sources: [{model: a, layer_range: [0, 4]}]\n",
        "imatrix": f"imatrix: {{calibration: {DATA / 'calibration.txt'}, chunks: 2}}\n",
        "quantize": "quantize: [Q4_K_M]\n",
    }
    parts.update(overrides)
    return "".join(parts.values())


def error_for(tmp_path: Path, text: str) -> RecipeError:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}: "), "the error names the file"
    return info.value


def test_valid_recipe_loads(tmp_path: Path, tiny_llama: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(recipe(tiny_llama))
    r = load(path)
    assert r.name == "ok" and r.quantize == ("Q4_K_M",) and r.imatrix == {"calibration": str(DATA / "calibration.txt"),
                                                                           "chunks": 2, "context": 512}
    assert "dtype" not in r.merge  # as in mergekit: unset means the inputs' own dtype


def test_unknown_top_level_key(tmp_path: Path, tiny_llama: Path) -> None:
    err = error_for(tmp_path, recipe(tiny_llama) + "quantise: [Q8_0]\n")
    assert err.key == "quantise"
    assert "unknown key (did you mean 'quantize'?)" in err.message


def test_unknown_nested_key(tmp_path: Path, tiny_llama: Path) -> None:
    err = error_for(tmp_path, recipe(tiny_llama, imatrix=f"imatrix: {{calibration: {DATA / 'calibration.txt'}, "
                                                         "chunk: 2}\n"))
    assert err.key == "imatrix.chunk" and "did you mean 'chunks'?" in err.message


def test_unknown_quant_type(tmp_path: Path, tiny_llama: Path) -> None:
    err = error_for(tmp_path, recipe(tiny_llama, quantize="quantize: [Q4_K_M, Q4_KM]\n"))
    assert err.key == "quantize[1]"
    assert "unknown quant type 'Q4_KM' (did you mean 'Q4_K_M'?)" in err.message


def test_layer_range_outside_model(tmp_path: Path, tiny_llama: Path) -> None:
    err = error_for(tmp_path, recipe(tiny_llama, merge="merge:\n  merge_method: passthrough\n  slices:\n"
                                     "    - sources: [{model: a, layer_range: [2, 9]}]\n"))
    assert err.key == "merge.slices[0].sources[0].layer_range"
    assert err.message == "[2, 9] is outside model 'a', which has 4 layers; use a range within [0, 4]"


def test_unknown_source_name(tmp_path: Path, tiny_llama: Path) -> None:
    err = error_for(tmp_path, recipe(tiny_llama, merge="merge:\n  merge_method: passthrough\n  slices:\n"
                                     "    - sources: [{model: b, layer_range: [0, 2]}]\n"))
    assert err.key == "merge.slices[0].sources[0].model"
    assert "unknown source 'b'" in err.message and "declare it under sources:" in err.message


def test_missing_source_directory(tmp_path: Path, tiny_llama: Path) -> None:
    err = error_for(tmp_path, recipe(tiny_llama, sources="sources:\n  a: {path: no/such/model}\n"))
    assert err.key == "sources.a.path" and "no model at" in err.message and "no/such/model" in err.message


def test_missing_calibration_file(tmp_path: Path, tiny_llama: Path) -> None:
    err = error_for(tmp_path, recipe(tiny_llama, imatrix="imatrix: {calibration: data/missing.txt}\n"))
    assert err.key == "imatrix.calibration"
    assert err.message == f"file not found: {tmp_path / 'data' / 'missing.txt'}; give a path relative to {tmp_path}"


def test_unsupported_merge_method(tmp_path: Path, tiny_llama: Path) -> None:
    err = error_for(tmp_path, recipe(tiny_llama, merge="merge:\n  merge_method: passtrough\n  slices: []\n"))
    assert err.key == "merge.merge_method" and "did you mean 'passthrough'?" in err.message


def test_wrong_type(tmp_path: Path, tiny_llama: Path) -> None:
    err = error_for(tmp_path, recipe(tiny_llama, imatrix=f"imatrix: {{calibration: {DATA / 'calibration.txt'}, "
                                                         "chunks: many}\n"))
    assert err.key == "imatrix.chunks" and err.message == "expected a positive integer, got 'many'"


def test_iq_type_without_imatrix(tmp_path: Path, tiny_llama: Path) -> None:
    err = error_for(tmp_path, recipe(tiny_llama, imatrix="", quantize="quantize: [IQ2_XS]\n"))
    assert err.key == "quantize[0]" and "needs an importance matrix" in err.message


def test_doit_refuses_a_bad_recipe_before_any_work(workspace: Workspace, tiny_llama: Path) -> None:
    workspace.write_recipe("bad", recipe(tiny_llama, quantize="quantize: [Q4_K_M, Q9_K]\n"))
    result = workspace.doit(check=False)
    assert result.returncode != 0
    assert f"mergeforge: {workspace.recipes / 'bad.yaml'}: quantize[1]: unknown quant type 'Q9_K'" in result.output
    assert "Traceback" not in result.output
    assert not workspace.build.exists() or not any((workspace.build).rglob("*.gguf"))
    assert not workspace.store.exists()


def test_which_tool_calls_count_is_a_recipe_choice(tmp_path: Path, tiny_llama: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(recipe(tiny_llama, eval="eval: {ggufs: [Q4_K_M]}\n"))
    assert load(path).eval["tool_calls"] == "api"              # default: only the API's tool_calls count
    path.write_text(recipe(tiny_llama, eval="eval: {ggufs: [Q4_K_M], tool_calls: text}\n"))
    assert load(path).eval["tool_calls"] == "text"
    err = error_for(tmp_path, recipe(tiny_llama, eval="eval: {ggufs: [Q4_K_M], tool_calls: txt}\n"))
    assert err.key == "eval.tool_calls" and "did you mean 'text'" in err.message and "one of api, text" in err.message
