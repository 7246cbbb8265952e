"""Every merge method against mergekit 0.1.5 (a test-only dependency; the product never imports it).

Deterministic methods: the whole merged model equals mergekit's within 1e-6 relative L2 per tensor (float32).
Randomized methods (DARE, DELLA): mergekit's random stream differs, so the statistics its definition implies are
checked instead (share of kept entries, the L1 rescale rule), plus bit-reproducibility with a seed.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import make_llama
from steps.plan import plan
from steps.recipe import load
from steps.store import execute

MERGEKIT = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent))
needs_mergekit = pytest.mark.skipif(MERGEKIT is None, reason="mergekit (test extra) is not installed")


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny base model and three fine-tunes of it (base + small, different perturbations), in float32: with
    continuous values no two magnitudes tie at a top-k threshold, where "the k largest" would be ambiguous."""
    root = tmp_path_factory.mktemp("family")
    base = make_llama(root / "base", seed=1)
    state = {n: v.float() for n, v in load_file(base / "model.safetensors").items()}
    g = torch.Generator().manual_seed(99)
    state = {n: v + 1e-4 * torch.randn(v.shape, generator=g) for n, v in state.items()}
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    models = {"base": base}
    for k in range(3):
        d = root / f"ft{k}"
        shutil.copytree(base, d)
        g = torch.Generator().manual_seed(100 + k)
        tuned = {n: v + 0.01 * torch.randn(v.shape, generator=g) for n, v in state.items()}
        save_file(tuned, d / "model.safetensors", metadata={"format": "pt"})
        models[f"ft{k}"] = d
    return models


def ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: dict[str, Path], merge: dict) -> Path:  # type: ignore[type-arg]
    monkeypatch.setenv("MERGEFORGE_BUILD", str(tmp_path / "build"))
    monkeypatch.setenv("MERGEFORGE_STORE", str(tmp_path / "cache"))
    recipe = {"sources": {k: {"path": str(v)} for k, v in family.items()}, "merge": merge}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    stages = {s.kind: s for s in plan(load(path))}
    execute(stages["fetch"])
    execute(stages["merge"])
    return stages["merge"].build_dir / "merged"


def theirs(tmp_path: Path, family: dict[str, Path], merge: dict) -> Path:  # type: ignore[type-arg]
    def swap(node):  # type: ignore[no-untyped-def]
        if isinstance(node, dict):
            return {k: (str(family[v]) if k in ("model", "base_model") and v in family else swap(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        return node
    config = tmp_path / "mergekit.yml"
    config.write_text(yaml.safe_dump(swap({k: v for k, v in merge.items() if k != "random_seed"})))
    out = tmp_path / "mergekit-out"
    assert MERGEKIT is not None
    proc = subprocess.run([MERGEKIT, str(config), str(out), "--copy-tokenizer", "--allow-crimes", "--random-seed",
                           "0", "-j", "1", "--quiet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), 1e-30))


DETERMINISTIC = {
    "linear": {"merge_method": "linear", "dtype": "float32",
               "models": [{"model": "ft0", "parameters": {"weight": 0.6}},
                          {"model": "ft1", "parameters": {"weight": [0.2, 0.9]}},
                          {"model": "ft2", "parameters": {"weight": [{"filter": "mlp", "value": 0.7},
                                                                     {"value": 0.1}]}}]},
    "linear_unnormalized": {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False},
                            "models": [{"model": "ft0", "parameters": {"weight": 0.5}},
                                       {"model": "ft1", "parameters": {"weight": 0.25}}]},
    "slerp": {"merge_method": "slerp", "dtype": "float32", "base_model": "ft0",
              "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]},
              "slices": [{"sources": [{"model": "ft0", "layer_range": [0, 4]},
                                      {"model": "ft1", "layer_range": [0, 4]}]}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "dtype": "float32", "base_model": "base",
                        "parameters": {"lambda": 0.8},
                        "models": [{"model": "ft0", "parameters": {"weight": 0.7}},
                                   {"model": "ft1", "parameters": {"weight": 0.3}}]},
    "ties": {"merge_method": "ties", "dtype": "float32", "base_model": "base",
             "models": [{"model": "ft0", "parameters": {"weight": 0.5, "density": 0.4}},
                        {"model": "ft1", "parameters": {"weight": 0.3, "density": [0.2, 0.8]}},
                        {"model": "ft2", "parameters": {"weight": 0.4, "density": 0.6}}]},
    "breadcrumbs": {"merge_method": "breadcrumbs", "dtype": "float32", "base_model": "base",
                    "models": [{"model": "ft0", "parameters": {"weight": 0.5, "density": 0.7, "gamma": 0.05}},
                               {"model": "ft1", "parameters": {"weight": 0.5, "density": 0.6}}]},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "dtype": "float32", "base_model": "base",
                         "models": [{"model": "ft0", "parameters": {"weight": 0.6, "density": 0.7}},
                                    {"model": "ft1", "parameters": {"weight": 0.4, "density": 0.8}}]},
    "model_stock": {"merge_method": "model_stock", "dtype": "float32", "base_model": "base",
                    "models": [{"model": "ft0"}, {"model": "ft1"}, {"model": "ft2"}]},
    "model_stock_filter_wise": {"merge_method": "model_stock", "dtype": "float32", "base_model": "base",
                                "parameters": {"filter_wise": True},
                                "models": [{"model": "ft0"}, {"model": "ft1"}, {"model": "ft2"}]},
    "sce": {"merge_method": "sce", "dtype": "float32", "base_model": "base", "parameters": {"select_topk": 0.5},
            "models": [{"model": "ft0"}, {"model": "ft1"}, {"model": "ft2"}]},
    "nuslerp": {"merge_method": "nuslerp", "dtype": "float32", "base_model": "base",
                "models": [{"model": "ft0", "parameters": {"weight": 0.3}},
                           {"model": "ft1", "parameters": {"weight": 0.7}}]},
    "nuslerp_row_wise": {"merge_method": "nuslerp", "dtype": "float32",
                         "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                         "models": [{"model": "ft0", "parameters": {"weight": 0.4}},
                                    {"model": "ft1", "parameters": {"weight": 0.6}}]},
    "karcher": {"merge_method": "karcher", "dtype": "float32",
                "models": [{"model": "ft0"}, {"model": "ft1"}, {"model": "ft2"}]},
    "passthrough_scale": {"merge_method": "passthrough", "dtype": "float32",
                          "slices": [{"sources": [{"model": "ft0", "layer_range": [0, 2]}]},
                                     {"sources": [{"model": "ft1", "layer_range": [1, 4],
                                                   "parameters": {"scale": [{"filter": "o_proj", "value": 0.5},
                                                                            {"value": 1.0}]}}]}]},
    # two models, overlapping slices, per-source scale (a gradient too); no base_model: the embeddings come from the
    # first slice's model, the final norm and lm_head from the last slice's, each with its source's scale at t = 0
    "passthrough_stack": {"merge_method": "passthrough", "dtype": "float32",
                          "slices": [{"sources": [{"model": "ft0", "layer_range": [0, 3],
                                                   "parameters": {"scale": 0.9}}]},
                                     {"sources": [{"model": "ft1", "layer_range": [1, 4],
                                                   "parameters": {"scale": [0.5, 1.0]}}]},
                                     {"sources": [{"model": "ft0", "layer_range": [2, 4]}]},
                                     {"sources": [{"model": "ft1", "layer_range": [3, 4],
                                                   "parameters": {"scale": [{"filter": "mlp", "value": 0.25},
                                                                            {"value": [0.8, 1.2]}]}}]}]},
    # base_model named: every module outside the layers comes from it (a deliberate difference, see below)
    "passthrough_base": {"merge_method": "passthrough", "dtype": "float32", "base_model": "base",
                         "slices": [{"sources": [{"model": "ft0", "layer_range": [0, 2]}]},
                                    {"sources": [{"model": "ft1", "layer_range": [1, 4]}]}]},
    "bf16_ties": {"merge_method": "ties", "dtype": "bfloat16", "base_model": "base",
                  "models": [{"model": "ft0", "parameters": {"weight": 0.5, "density": 0.5}},
                             {"model": "ft1", "parameters": {"weight": 0.5, "density": 0.5}}]},
}


def unambiguous_positions(merge: dict, family: dict[str, Path]) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    """Per tensor, the positions where no model's task vector ties with its own top-k threshold."""
    from steps.methods import evaluate, layer_position
    base = tensors(family[merge["base_model"]])
    keep = {k: torch.ones(v.shape, dtype=torch.bool) for k, v in base.items()}
    for entry in merge["models"]:
        model = tensors(family[entry["model"]])
        for k in base:
            layer = int(k.split(".")[2]) if k.startswith("model.layers.") else None
            t = layer_position(layer, 4) if layer is not None else 0.0
            density = float(evaluate(entry["parameters"]["density"], k, t))
            magnitude = (model[k] - base[k]).abs().flatten()
            n = magnitude.numel()
            if density >= 1:
                continue
            threshold = torch.kthvalue(magnitude, n - max(1, int(density * n)) + 1).values
            keep[k] &= (magnitude != threshold).reshape(keep[k].shape)
    return keep


@needs_mergekit
@pytest.mark.parametrize("case", sorted(DETERMINISTIC))
def test_matches_mergekit(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          family: dict[str, Path]) -> None:
    merge = DETERMINISTIC[case]
    got, want = tensors(ours(tmp_path, monkeypatch, family, merge)), tensors(theirs(tmp_path, family, merge))
    assert got.keys() == want.keys()
    if merge["merge_method"] == "passthrough" and "base_model" in merge:
        # Deliberate difference: with base_model named, the modules outside the decoder layers come from it here;
        # mergekit takes the embeddings from the first slice's model, the final norm and lm_head from the last's.
        base = tensors(family[merge["base_model"]])
        for k in ("model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"):
            assert torch.equal(got[k], base[k].float())
            del got[k], want[k]
    # bf16: many magnitudes tie at the top-k threshold; which tied entries are kept is mergekit's argsort order
    # there and index order here (both keep exactly k), so the results differ by a few tied entries.
    tolerance = 2e-2 if merge["dtype"] == "bfloat16" else 1e-6
    if merge["merge_method"] == "ties" and merge["dtype"] == "float32":
        # Entries whose magnitude equals a model's top-k threshold are ambiguous ("the k largest" of tied values):
        # mergekit keeps the ones its argsort happens to put first, this engine the first in index order.
        for k, keep in unambiguous_positions(merge, family).items():
            assert float(keep.float().mean()) > 0.95
            got[k], want[k] = got[k][keep], want[k][keep]
    worst = max((rel_l2(got[k], want[k]), k) for k in want)
    assert worst[0] <= tolerance, f"{case}: {worst[1]} differs from mergekit by {worst[0]:.3g} relative L2"
    ours_cfg = json.loads((tmp_path / "build" / "r" / "merged" / "config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "mergekit-out" / "config.json").read_text())
    assert ours_cfg["num_hidden_layers"] == theirs_cfg["num_hidden_layers"]


RANDOM = {
    "dare_ties": {"merge_method": "dare_ties", "dtype": "float32", "base_model": "base",
                  "models": [{"model": "ft0", "parameters": {"weight": 1.0, "density": 0.3}}]},
    "dare_linear": {"merge_method": "dare_linear", "dtype": "float32", "base_model": "base",
                    "models": [{"model": "ft0", "parameters": {"weight": 1.0, "density": 0.3}}]},
    "della": {"merge_method": "della", "dtype": "float32", "base_model": "base",
              "models": [{"model": "ft0", "parameters": {"weight": 1.0, "density": 0.4, "epsilon": 0.2}}]},
    "della_linear": {"merge_method": "della_linear", "dtype": "float32", "base_model": "base",
                     "models": [{"model": "ft0", "parameters": {"weight": 1.0, "density": 0.4, "epsilon": 0.2}}]},
}


@pytest.mark.parametrize("case", sorted(RANDOM))
def test_random_methods_keep_density_and_rescale(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 family: dict[str, Path]) -> None:
    merge = RANDOM[case]
    density = merge["models"][0]["parameters"]["density"]
    out = tensors(ours(tmp_path / "a", monkeypatch, family, {**merge, "random_seed": 7}))
    base, tuned = tensors(family["base"]), tensors(family["ft0"])
    kept = total = 0
    for name in (n for n in base if n.endswith("proj.weight")):
        delta = tuned[name].float() - base[name].float()
        merged = out[name].float() - base[name].float()
        keep = merged != 0
        kept += int(keep.sum())
        total += keep.numel()
        # the L1 rescale rule: the kept entries carry the whole task vector's L1 norm
        assert float(merged.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-4)
        # a kept entry is the original entry times one common factor (compared where float32 rounding of
        # base + delta - base is small against the entry)
        large = keep & (delta.abs() > 1e-3)
        ratio = merged[large] / delta[large]
        assert float(ratio.max() - ratio.min()) < 1e-3 * float(ratio.mean())
    assert kept / total == pytest.approx(density, abs=0.01)
    again = tensors(ours(tmp_path / "b", monkeypatch, family, {**merge, "random_seed": 7}))
    other = tensors(ours(tmp_path / "c", monkeypatch, family, {**merge, "random_seed": 8}))
    assert all(torch.equal(out[k], again[k]) for k in out), "the same seed gives the same bytes"
    assert not all(torch.equal(out[k], other[k]) for k in out), "another seed gives another drop pattern"


def test_della_keeps_large_entries_more_often(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              family: dict[str, Path]) -> None:
    merge = RANDOM["della"]
    out = tensors(ours(tmp_path, monkeypatch, family, merge))
    base, tuned = tensors(family["base"]), tensors(family["ft0"])
    name = "model.layers.0.mlp.up_proj.weight"
    delta = (tuned[name].float() - base[name].float())
    kept = (out[name].float() - base[name].float()) != 0
    order = torch.argsort(torch.argsort(delta.abs(), dim=1), dim=1).float() / (delta.shape[1] - 1)
    low, high = kept[order < 0.2].float().mean(), kept[order > 0.8].float().mean()
    # keep probability runs from density - eps (0.2) for the smallest to density + eps (0.6) for the largest
    assert 0.17 < float(low) < 0.31 and 0.49 < float(high) < 0.63


def test_interleave(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: dict[str, Path]) -> None:
    out = ours(tmp_path, monkeypatch, family, {"merge_method": "interleave",
                                               "models": [{"model": "ft0"}, {"model": "ft1"}]})
    got, a, b = tensors(out), tensors(family["ft0"]), tensors(family["ft1"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 8
    for i in range(4):
        for src, new in ((a, 2 * i), (b, 2 * i + 1)):
            for k, v in src.items():
                if k.startswith(f"model.layers.{i}."):
                    assert torch.equal(got[k.replace(f"layers.{i}.", f"layers.{new}.")], v)
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


def test_frankenmerge_with_repeated_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          family: dict[str, Path]) -> None:
    out = ours(tmp_path, monkeypatch, family, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "ft0", "layer_range": [0, 3]}]},
        {"sources": [{"model": "ft0", "layer_range": [2, 4]}]}]})
    got, a = tensors(out), tensors(family["ft0"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    for new, old in enumerate([0, 1, 2, 2, 3]):
        assert torch.equal(got[f"model.layers.{new}.mlp.up_proj.weight"], a[f"model.layers.{old}.mlp.up_proj.weight"])


@needs_mergekit
def test_mergekit_yaml_pastes_in_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           family: dict[str, Path]) -> None:
    """A mergekit config with local model paths is a valid merge block as it stands."""
    merge = {"merge_method": "task_arithmetic", "base_model": str(family["base"]), "dtype": "float32",
             "models": [{"model": str(family["ft0"]), "parameters": {"weight": 0.5}},
                        {"model": str(family["ft1"]), "parameters": {"weight": 0.5}}]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(merge))
    monkeypatch.setenv("MERGEFORGE_BUILD", str(tmp_path / "build"))
    monkeypatch.setenv("MERGEFORGE_STORE", str(tmp_path / "cache"))
    recipe = tmp_path / "pasted.yaml"
    recipe.write_text("merge:\n" + "".join(f"  {line}\n" for line in (tmp_path / "mk.yml").read_text().splitlines()))
    stages = {s.kind: s for s in plan(load(recipe))}
    execute(stages["fetch"])
    execute(stages["merge"])
    got = tensors(stages["merge"].build_dir / "merged")
    want = tensors(theirs(tmp_path, family, merge))
    assert got.keys() == want.keys()
    assert max(rel_l2(got[k], want[k]) for k in want) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_radix_selection_finds_the_kth_largest(dtype: torch.dtype) -> None:
    from steps.methods.task_arithmetic import top_k_mask
    g = torch.Generator().manual_seed(3)
    for n in (1, 1000, 300_001):
        x = (torch.randn(n, generator=g) * 0.01).to(dtype)
        ordered = torch.sort(x.abs().double(), descending=True).values
        for k in {1, 7 % n or 1, n // 3 or 1, n}:
            mask = top_k_mask(x, k)
            assert int(mask.sum()) == k and float(x.abs()[mask].min()) == float(ordered[k - 1])
            if k < n:
                assert float(x.abs()[~mask].max()) <= float(ordered[k - 1])
