"""The merge stage on tiny models built in code: passthrough stacking against references assembled by hand."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from steps.merge import find_layer_prefix
from steps.plan import plan
from steps.recipe import load
from steps.store import execute
from steps.tensors import INDEX_NAME, ModelReader


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MERGEFORGE_BUILD", str(tmp_path / "build"))
    monkeypatch.setenv("MERGEFORGE_STORE", str(tmp_path / "cache"))
    return tmp_path


def run_merge(tmp_path: Path, text: str) -> tuple[Path, dict]:  # type: ignore[type-arg]
    path = tmp_path / "m.yaml"
    path.write_text(text)
    stages = {s.kind: s for s in plan(load(path))}
    execute(stages["fetch"])
    execute(stages["merge"])
    target = json.loads(stages["merge"].target.read_text())
    return stages["merge"].build_dir / "merged", target


def state(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


# --------------------------------------------------------------------------------------------- layer discovery

@pytest.mark.parametrize("names, n, prefix", [
    (["model.layers.0.a", "model.layers.1.a", "model.embed.weight"], 2, "model.layers"),
    (["transformer.h.0.attn", "transformer.h.1.attn", "transformer.h.2.attn"], 3, "transformer.h"),
    (["gpt_neox.layers.0.x", "gpt_neox.layers.1.x"], 2, "gpt_neox.layers"),
    (["model.language_model.layers.0.x", "model.language_model.layers.1.x", "model.visual.blocks.0.x",
      "model.visual.blocks.1.x", "mtp.layers.0.x"], 2, "model.language_model.layers"),
])
def test_find_layer_prefix(names: list[str], n: int, prefix: str) -> None:
    assert find_layer_prefix(names, n) == prefix


def test_find_layer_prefix_explains_failure() -> None:
    with pytest.raises(ValueError, match=r"no tensor prefix has exactly 3 numbered blocks.*model.layers \(2\)"):
        find_layer_prefix(["model.layers.0.a", "model.layers.1.a"], 3)


# --------------------------------------------------------------------------------------------- Llama

def test_passthrough_llama_matches_hand_assembled_reference(stores: Path, tiny_llama: Path,
                                                            tiny_llama_b: Path) -> None:
    from transformers import LlamaForCausalLM
    out, target = run_merge(stores, f"""
sources:
  a: {{path: {tiny_llama}}}
  b: {{path: {tiny_llama_b}}}
merge:
  merge_method: passthrough
  dtype: bfloat16
  slices:
    - sources: [{{model: a, layer_range: [0, 3]}}]
    - sources: [{{model: b, layer_range: [1, 4]}}]
    - sources: [{{model: a, layer_range: [2, 3], parameters: {{scale: 0.5}}}}]
""")
    a, b, merged = state(tiny_llama), state(tiny_llama_b), state(out)
    expected: dict[str, torch.Tensor] = {k: v for k, v in a.items() if not k.startswith("model.layers.")}
    # no base_model: as in mergekit, the final norm and lm_head come from the last slice, with its scale
    for k in ("model.norm.weight", "lm_head.weight"):
        expected[k] = (a[k].float() * 0.5).to(a[k].dtype)
    plan_ = [("a", 0, 1.0), ("a", 1, 1.0), ("a", 2, 1.0), ("b", 1, 1.0), ("b", 2, 1.0), ("b", 3, 1.0), ("a", 2, 0.5)]
    for new, (src, old, scale) in enumerate(plan_):
        model = a if src == "a" else b
        for k, v in model.items():
            if k.startswith(f"model.layers.{old}."):
                expected[k.replace(f"model.layers.{old}.", f"model.layers.{new}.")] = (
                    v if scale == 1.0 else (v.float() * scale).to(v.dtype))
    assert merged.keys() == expected.keys()
    for k in expected:
        assert torch.equal(merged[k], expected[k]), k
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 7
    assert (out / "tokenizer.model").read_bytes() == (tiny_llama / "tokenizer.model").read_bytes()
    model, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = LlamaForCausalLM(model.config)
    ref.load_state_dict({k: v.float() for k, v in expected.items()}, strict=True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert target["merge"]["layer_sources"] == [f"{s}:{i}" for s, i, _ in plan_]
    assert target["merge"]["left_out"] == {
        "a": sorted(k for k in a if k.startswith("model.layers.3.")),
        "b": sorted(k for k in b if k.startswith("model.layers.0.") or not k.startswith("model.layers."))}


def test_small_shards_get_an_index_and_dtype_conversion(stores: Path, tiny_llama: Path) -> None:
    out, target = run_merge(stores, f"""
sources:
  a: {{path: {tiny_llama}}}
merge:
  merge_method: passthrough
  dtype: float32
  shard_bytes: 2000000
  slices:
    - sources: [{{model: a, layer_range: [0, 4]}}]
""")
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == target["merge"]["shards"]
    merged, a = state(out), state(tiny_llama)
    assert merged.keys() == a.keys()
    for k, v in a.items():
        assert merged[k].dtype == torch.float32 and torch.equal(merged[k], v.float())
    for shard in shards:                                    # every shard is a valid safetensors file
        with safe_open(out / shard, "pt") as f:
            assert set(f.keys()) == {k for k, s in index["weight_map"].items() if s == shard}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


# --------------------------------------------------------------------------------------------- Qwen3.5 hybrid

def make_qwen35(dest: Path, seed: int) -> Path:
    """A tiny multimodal Qwen3.5 (hybrid linear/full attention) with MTP tensors, as the Hub ships them."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    text = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_num_key_heads=2, linear_num_value_heads=4,
                layer_types=["linear_attention"] * 3 + ["full_attention"])
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=1)
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vision))
    model.save_pretrained(dest)
    tensors = load_file(dest / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for name, shape in (("mtp.fc.weight", (64, 128)), ("mtp.layers.0.input_layernorm.weight", (64,)),
                        ("mtp.layers.0.mlp.up_proj.weight", (128, 64)), ("mtp.norm.weight", (64,))):
        tensors[name] = torch.randn(shape, generator=g)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    from conftest import write_word_tokenizer
    write_word_tokenizer(dest, 256)
    return dest


def test_qwen35_hybrid_multimodal_stack(stores: Path) -> None:
    from transformers import Qwen3_5ForConditionalGeneration
    a = make_qwen35(stores / "qa", 1)
    b = make_qwen35(stores / "qb", 2)
    out, target = run_merge(stores, f"""
sources:
  a: {{path: {a}}}
  b: {{path: {b}}}
merge:
  merge_method: passthrough
  dtype: float32
  slices:
    - sources: [{{model: a, layer_range: [0, 4]}}]
    - sources: [{{model: b, layer_range: [0, 4]}}]
""")
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 8
    assert config["text_config"]["layer_types"] == (["linear_attention"] * 3 + ["full_attention"]) * 2
    assert config["vision_config"]["depth"] == 2
    sa, sb, merged = state(a), state(b), state(out)
    prefix = "model.language_model.layers."
    for k, v in sa.items():
        if not k.startswith(prefix):
            assert torch.equal(merged[k], v), k          # embeddings, norm, lm_head, vision tower, MTP: from A
    for k, v in sb.items():
        if k.startswith(prefix):
            i, rest = k[len(prefix):].split(".", 1)
            assert torch.equal(merged[f"{prefix}{int(i) + 4}.{rest}"], v), k
    assert any(k.startswith("mtp.layers.0.") for k in merged)
    left_out_b = target["merge"]["left_out"]["b"]
    assert left_out_b == sorted(k for k in sb if not k.startswith(prefix))
    model, info = Qwen3_5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.text_config.num_hidden_layers == 8
    # the reference: a model of the doubled config with its layers assembled by hand from A and B
    ref = Qwen3_5ForConditionalGeneration(model.config)
    ref_state = {k: v for k, v in sa.items() if not k.startswith("mtp.")}
    for k, v in sb.items():
        if k.startswith(prefix):
            i, rest = k[len(prefix):].split(".", 1)
            ref_state[f"{prefix}{int(i) + 4}.{rest}"] = v
    ref.load_state_dict(ref_state, strict=True)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.equal(got, want)


def test_unchanged_tensors_are_copied_as_bytes(tiny_llama: Path, stores: Path) -> None:
    out, _ = run_merge(stores, f"""
sources:
  a: {{path: {tiny_llama}}}
merge:
  merge_method: passthrough
  slices:
    - sources: [{{model: a, layer_range: [0, 4]}}]
""")
    src, dst = ModelReader(tiny_llama), ModelReader(out)
    for name in src.tensors:
        assert src.raw(name) == dst.raw(name)


# --------------------------------------------------------------------------------------------- memory

PEAK_RSS = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True);"
            "print('PEAK_RSS_KIB=%d' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


@pytest.mark.slow
@pytest.mark.parametrize("method, bound_mib", [("passthrough", 150), ("ties", 700)])
def test_peak_rss_is_bounded_by_tensors_not_models(method: str, bound_mib: int, tmp_path: Path) -> None:
    """Three 364 MiB inputs (largest tensor 8 MiB). Measured here: passthrough 49 MiB peak (no torch needed for a
    byte copy), ties 463 MiB (about 220 of them torch itself), against 1092 MiB of inputs."""
    import os
    import re
    import subprocess
    import sys

    from conftest import make_synthetic_llama
    models = {n: make_synthetic_llama(tmp_path / n, layers=12, hidden=1024, inter=4096, vocab=4096, seed=i)
              for i, n in enumerate(("base", "a", "b"))}
    size_mib = sum(p.stat().st_size for p in models["a"].glob("*.safetensors")) / 2**20
    assert size_mib > 350
    merge = ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 12]}]},
                                                          {"sources": [{"model": "b", "layer_range": [4, 12]}]}]}
             if method == "passthrough" else
             {"merge_method": "ties", "base_model": "base", "dtype": "bfloat16",
              "models": [{"model": "a", "parameters": {"weight": 0.5, "density": 0.5}},
                         {"model": "b", "parameters": {"weight": 0.5, "density": 0.5}}]})
    import yaml
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "big.yaml").write_text(yaml.safe_dump(
        {"sources": {n: {"path": str(p)} for n, p in models.items()}, "merge": merge}))
    env = dict(os.environ, MERGEFORGE_RECIPES=str(tmp_path / "recipes"), MERGEFORGE_BUILD=str(tmp_path / "build"),
               MERGEFORGE_STORE=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-m", "steps.fetch", "big"], env=env, check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "steps.merge", "big"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_mib = int(re.search(r"PEAK_RSS_KIB=(\d+)", proc.stdout).group(1)) / 1024  # type: ignore[union-attr]
    out_mib = sum(p.stat().st_size for p in (tmp_path / "build" / "big" / "merged").glob("*.safetensors")) / 2**20
    assert out_mib > 350
    print(f"{method}: peak RSS {peak_mib:.0f} MiB for {size_mib:.0f} MiB inputs")
    assert peak_mib < bound_mib, f"{method}: peak RSS {peak_mib:.0f} MiB for {size_mib:.0f} MiB inputs"


def test_pickled_weights_are_refused(stores: Path, tiny_llama: Path) -> None:
    import shutil

    from steps.errors import RecipeError
    pickled = stores / "pickled"
    shutil.copytree(tiny_llama, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(RecipeError, match=r"sources\.a: cannot merge model 'a': .*no \*\.safetensors files "
                                          r"\(pickled \.bin weights are not loaded\)"):
        run_merge(stores, f"""
sources:
  a: {{path: {pickled}}}
merge:
  merge_method: passthrough
  slices:
    - sources: [{{model: a, layer_range: [0, 4]}}]
""")


def test_vision_config_with_the_text_depth_keeps_its_depth(stores: Path) -> None:
    """An InternVL-style model whose vision tower has as many layers as its language model (4 and 4): stacking the
    language model to 8 layers leaves the vision config at 4, and transformers loads every vision tensor."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from conftest import write_word_tokenizer
    torch.manual_seed(0)
    config = InternVLConfig(
        text_config=dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                           image_size=28, patch_size=14))
    src = stores / "internvl"
    InternVLForConditionalGeneration(config).save_pretrained(src)
    write_word_tokenizer(src, 256)
    out, _ = run_merge(stores, f"""
sources:
  a: {{path: {src}}}
merge:
  merge_method: passthrough
  slices:
    - sources: [{{model: a, layer_range: [0, 4]}}]
    - sources: [{{model: a, layer_range: [0, 4]}}]
""")
    merged = json.loads((out / "config.json").read_text())
    assert merged["text_config"]["num_hidden_layers"] == 8
    assert merged["vision_config"]["num_hidden_layers"] == 4
    model, info = InternVLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert len(model.model.vision_tower.encoder.layer) == 4 and len(model.model.language_model.layers) == 8
