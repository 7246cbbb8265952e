"""Hostile and mismatched weights: corrupt safetensors shards and indexes, integer and boolean buffers, and models
that cannot be stacked or merged together, each refused (or handled) before any output byte is written."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT, Workspace, assert_nothing_half_written, assert_refused
from steps.errors import RecipeError
from steps.plan import plan
from steps.recipe import load
from steps.store import execute
from steps.tensors import INDEX_NAME, ModelReader, OutTensor, write_model

LAYER = {"self_attn.q_proj.weight": lambda h: (h, h), "self_attn.k_proj.weight": lambda h: (h // 2, h),
         "self_attn.v_proj.weight": lambda h: (h // 2, h), "self_attn.o_proj.weight": lambda h: (h, h),
         "mlp.gate_proj.weight": lambda h: (2 * h, h), "mlp.up_proj.weight": lambda h: (2 * h, h),
         "mlp.down_proj.weight": lambda h: (h, 2 * h), "input_layernorm.weight": lambda h: (h,),
         "post_attention_layernorm.weight": lambda h: (h,)}
TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "I64": torch.int64, "BOOL": torch.bool}


def make_model(dest: Path, seed: int = 0, layers: int = 2, hidden: int = 16, vocab: int = 32,
               tensors: dict[str, tuple[str, tuple[int, ...]] | None] | None = None,
               config: dict[str, Any] | None = None) -> Path:
    """A tiny Llama-shaped float32 model with random values, written by the engine's own writer. `tensors` adds or
    replaces tensors (name -> (dtype, shape); None removes one), `config` adds or replaces config keys."""
    shapes: dict[str, tuple[str, tuple[int, ...]] | None] = {"model.embed_tokens.weight": ("F32", (vocab, hidden))}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}": ("F32", f(hidden)) for k, f in LAYER.items()})
    shapes.update({"model.norm.weight": ("F32", (hidden,)), "lm_head.weight": ("F32", (vocab, hidden))})
    shapes.update(tensors or {})
    gen = torch.Generator().manual_seed(seed)

    def produce(dtype: str, shape: tuple[int, ...]):  # type: ignore[no-untyped-def]
        if dtype == "I64":
            value = torch.randint(0, 1000, shape, generator=gen)
        elif dtype == "BOOL":
            value = torch.randint(0, 2, shape, generator=gen).bool()
        else:
            value = torch.randn(shape, generator=gen).to(TORCH[dtype])
        return lambda: value.contiguous().reshape(-1).view(torch.uint8).numpy()

    dest.mkdir(parents=True)
    write_model(dest, [OutTensor(n, spec[0], spec[1], produce(*spec)) for n, spec in shapes.items() if spec],
                1 << 30)
    (dest / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": vocab, "torch_dtype": "float32", **(config or {})}))
    (dest / "tokenizer.json").write_text("{}")        # a stand-in: the merge stage only copies it
    return dest


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MERGEFORGE_BUILD", str(tmp_path / "build"))
    monkeypatch.setenv("MERGEFORGE_STORE", str(tmp_path / "cache"))
    return tmp_path


def recipe_text(sources: dict[str, Path], merge: str) -> str:
    return "sources:\n" + "".join(f"  {n}: {{path: {p}}}\n" for n, p in sources.items()) + merge


def run_merge(stores: Path, name: str, text: str) -> Path:
    """Fetch and merge the recipe `name` (its text given); the merged model's directory."""
    path = stores / "recipes" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    stages = {s.kind: s for s in plan(load(path))}
    execute(stages["fetch"])
    execute(stages["merge"])
    return stages["merge"].build_dir / "merged"


def raw_tensors(directory: Path) -> dict[str, bytes]:
    reader = ModelReader(directory)
    try:
        return {name: reader.raw(name) for name in reader.tensors}
    finally:
        reader.close()


# ------------------------------------------------------------------------------------ safetensors validation

def write_shard(path: Path, header: Any, data: bytes, blob: bytes | None = None) -> Path:
    """A shard with exactly this header (a JSON value, or raw bytes as blob) and these data bytes."""
    blob = json.dumps(header).encode() if blob is None else blob
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


UP = "model.layers.0.mlp.up_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"


def entry(dtype: str, shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# (header, data bytes, what the message says): every one of them is refused by the safetensors library as well
CORRUPT = {
    "overlap": ({UP: entry("F32", [4, 6], 0, 96), DOWN: entry("F32", [6, 4], 64, 160)}, 160,
                rf"tensor {DOWN}: data_offsets \[64, 160\] overlap tensor {UP} \(which ends at 96\)"),
    "gap": ({UP: entry("F32", [4, 6], 0, 96), DOWN: entry("F32", [6, 4], 100, 196)}, 196,
            rf"tensor {DOWN}: data_offsets \[100, 196\] leave bytes 96 to 100 after tensor {UP} unused"),
    "gap_at_start": ({UP: entry("F32", [4, 6], 8, 104)}, 104, rf"tensor {UP}: .* after the header unused"),
    "truncated": ({UP: entry("F32", [32, 32], 0, 4096)}, 1000,
                  r"file is truncated: header says 4096 bytes of data, the file holds 1000; download it again"),
    "trailing_bytes": ({UP: entry("F32", [4, 6], 0, 96)}, 100, r"4 bytes follow the last tensor's data"),
    "wrong_byte_count": ({UP: entry("F32", [4, 6], 0, 48)}, 48,
                         rf"tensor {UP}: data_offsets \[0, 48\] hold 48 bytes, its shape \[4, 6\] of F32 needs 96"),
    "end_before_begin": ({UP: entry("F32", [0], 8, 0)}, 8, rf"tensor {UP}: data_offsets \[8, 0\] end before"),
    "unknown_dtype": ({UP: entry("F99", [4], 0, 16)}, 16, rf"tensor {UP}: unsupported dtype \"F99\""),
    "negative_shape": ({UP: entry("F32", [-4], 0, 16)}, 16, rf"tensor {UP}: shape \[-4\] is not a list of non-neg"),
    "float_shape": ({UP: entry("F32", [4.0], 0, 16)}, 16, rf"tensor {UP}: shape \[4.0\] is not"),
    "bool_shape": ({UP: entry("F32", [True, 4], 0, 16)}, 16, rf"tensor {UP}: shape \[true, 4\] is not"),
    "three_offsets": ({UP: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 16]}}, 16,
                      rf"tensor {UP}: data_offsets \[0, 16, 16\] is not \[begin, end\]"),
    "no_dtype": ({UP: {"shape": [4], "data_offsets": [0, 16]}}, 16, rf"tensor {UP}: the entry has no dtype"),
    "entry_not_object": ({UP: [1, 2]}, 0, rf"tensor {UP}: the entry is a JSON list"),
    "header_not_object": ([1, 2], 0, r"the header is a JSON list, not an object"),
    "metadata_not_strings": ({"__metadata__": {"format": 1}, UP: entry("F32", [4], 0, 16)}, 16,
                             r"__metadata__ is not an object of strings"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_headers_are_refused_like_safetensors(case: str, tmp_path: Path) -> None:
    header, size, message = CORRUPT[case]
    shard = write_shard(tmp_path / "m" / "model.safetensors", header, bytes(size))
    with pytest.raises(ValueError, match=rf"^{shard}: {message}"):
        ModelReader(tmp_path / "m")
    with pytest.raises(Exception, match="Error while deserializing header"):
        safe_open(str(shard), "pt")


@pytest.mark.parametrize("blob, message", [
    (b'{"a": ', r"the header is not valid JSON \(Expecting value at character 6\)"),
    (b'{"\xff": 1}', r"the header is not valid UTF-8 \(byte 2\)"),
    (b'{"a": {}, "a": {}}', r"the header holds 'a' twice in one object"),
])
def test_unreadable_headers_are_refused(blob: bytes, message: str, tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "model.safetensors", None, b"", blob=blob)
    with pytest.raises(ValueError, match=rf"^{shard}: {message}"):
        ModelReader(tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"\x01\x02", r"file is truncated: 2 bytes, too short for a safetensors header"),
    (struct.pack("<Q", 100) + b"{}", r"file is truncated: the header is 100 bytes, the file holds 2 after its length"),
    (struct.pack("<Q", 200 << 20) + b"{}", r"safetensors header of 209715200 bytes \(at most 104857600 allowed\)"),
])
def test_impossible_header_lengths_are_refused(content: bytes, message: str, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'model.safetensors'}: {message}"):
        ModelReader(tmp_path)


def test_valid_shards_of_every_layout_are_read(tmp_path: Path) -> None:
    """Zero-sized tensors, entries listed out of offset order, metadata and non-float dtypes are all valid."""
    header = {"__metadata__": {"format": "pt"}, DOWN: entry("F32", [6, 4], 96, 192),
              "empty": entry("F32", [0, 4], 0, 0),
              UP: entry("F32", [4, 6], 0, 96), "ids": entry("I64", [2], 192, 208), "mask": entry("BOOL", [3], 208, 211)}
    write_shard(tmp_path / "model.safetensors", header, bytes(range(211)))
    reader = ModelReader(tmp_path)
    assert reader.raw("ids") == bytes(range(192, 208)) and reader.tensors["mask"].shape == (3,)
    reader.close()


def sharded(directory: Path) -> Path:
    """Tensors a, b and c (16 bytes each), one per shard, with an index."""
    directory.mkdir(exist_ok=True)
    write_model(directory, [OutTensor(n, "F32", (4,), lambda: bytes(16)) for n in ("a", "b", "c")], 20)
    return directory / INDEX_NAME


def test_a_truncated_shard_of_a_sharded_model_is_caught_when_opening(tmp_path: Path) -> None:
    index = json.loads(sharded(tmp_path / "s").read_text())
    shard = tmp_path / "s" / index["weight_map"]["b"]
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(ValueError, match=rf"^{shard}: file is truncated: header says 16 bytes of data, the file "
                                         r"holds 13; download it again"):
        ModelReader(tmp_path / "s")


def test_broken_indexes_are_refused(tmp_path: Path) -> None:
    index = sharded(tmp_path)
    good = json.loads(index.read_text())
    lost = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps({**good, "weight_map": {**good["weight_map"], "d": lost}}))
    with pytest.raises(ValueError, match=rf"^{index}: shard model-00009-of-00009.safetensors listed in weight_map "
                                         "is missing; download it again"):
        ModelReader(tmp_path)
    index.write_text(json.dumps({**good, "weight_map": {**good["weight_map"], "a": good["weight_map"]["b"]}}))
    with pytest.raises(ValueError, match=rf"^{index}: weight_map puts tensor a in model-00002-of-00003.safetensors, "
                                         "which does not hold it"):
        ModelReader(tmp_path)
    index.write_text('{"weight_map": {"a": ')
    with pytest.raises(ValueError, match=rf"^{index}: not valid JSON \(.*\); download it again"):
        ModelReader(tmp_path)
    index.write_text("[]")
    with pytest.raises(ValueError, match=rf"^{index}: no weight_map of tensor names to shard files"):
        ModelReader(tmp_path)


def test_a_tensor_in_two_shards_is_refused(tmp_path: Path) -> None:
    write_shard(tmp_path / "a.safetensors", {UP: entry("F32", [4], 0, 16)}, bytes(16))
    write_shard(tmp_path / "b.safetensors", {UP: entry("F32", [4], 0, 16)}, bytes(16))
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'b.safetensors'}: tensor {UP} is also in a.safetensors"):
        ModelReader(tmp_path)


def test_a_truncated_shard_is_one_line_from_doit(workspace: Workspace, tmp_path: Path) -> None:
    model = make_model(tmp_path / "a")
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    workspace.write_recipe("r", recipe_text({"a": model}, """merge:
  merge_method: passthrough
  slices:
    - sources: [{model: a, layer_range: [0, 2]}]
"""))
    assert_refused(workspace, "r.yaml: sources.a: cannot merge model 'a': ", f"{shard}: file is truncated: header "
                   "says", "download it again", args=("merge:r",))


# ------------------------------------------------------------------------------------ integer and boolean tensors

def with_buffers(dest: Path, seed: int) -> Path:
    """A model with an int64 position_ids buffer outside the layers and a boolean mask in every layer."""
    return make_model(dest, seed, tensors={"model.position_ids": ("I64", (1, 8)),
                                           **{f"model.layers.{i}.self_attn.mask": ("BOOL", (4, 4)) for i in range(2)}})


def test_integer_and_boolean_tensors_are_copied_from_the_base(stores: Path) -> None:
    a, b, c = (with_buffers(stores / n, seed) for n, seed in (("a", 1), ("b", 2), ("c", 3)))
    ra, rb, rc = raw_tensors(a), raw_tensors(b), raw_tensors(c)
    mask = "model.layers.{}.self_attn.mask"
    linear = raw_tensors(run_merge(stores, "linear", recipe_text({"a": a, "b": b}, """merge:
  merge_method: linear
  dtype: bfloat16
  models: [{model: a, parameters: {weight: 0.5}}, {model: b, parameters: {weight: 0.5}}]
""")))
    assert linear["model.position_ids"] == ra["model.position_ids"]
    assert all(linear[mask.format(i)] == ra[mask.format(i)] for i in range(2))       # the first model's
    assert len(linear["model.norm.weight"]) == 16 * 2                                 # merged in bfloat16
    ties = raw_tensors(run_merge(stores, "ties", recipe_text({"a": a, "b": b, "c": c}, """merge:
  merge_method: ties
  base_model: c
  models: [{model: a, parameters: {weight: 0.5, density: 0.5}}, {model: b, parameters: {weight: 0.5, density: 0.5}}]
""")))
    assert ties["model.position_ids"] == rc["model.position_ids"]
    assert all(ties[mask.format(i)] == rc[mask.format(i)] for i in range(2))         # the base's, not the first's
    out = run_merge(stores, "passthrough", recipe_text({"a": a, "b": b}, """merge:
  merge_method: passthrough
  dtype: float16
  slices:
    - sources: [{model: a, layer_range: [0, 2]}]
    - sources: [{model: b, layer_range: [1, 2], parameters: {scale: 0.5}}]
"""))
    stacked = raw_tensors(out)
    assert {n: i.dtype for n, i in ModelReader(out).tensors.items() if "norm" not in n and "proj" not in n} == {
        "model.embed_tokens.weight": "F16", "lm_head.weight": "F16", "model.position_ids": "I64",
        **{mask.format(i): "BOOL" for i in range(3)}}
    assert stacked["model.position_ids"] == ra["model.position_ids"]
    assert [stacked[mask.format(i)] for i in range(3)] == [ra[mask.format(0)], ra[mask.format(1)], rb[mask.format(1)]]


# ------------------------------------------------------------------------------------ preflight

def refusal(stores: Path, sources: dict[str, Path], merge: str) -> RecipeError:
    """The merge's RecipeError; nothing of the merged model written."""
    with pytest.raises(RecipeError) as info:
        run_merge(stores, "refused", recipe_text(sources, merge))
    assert not (stores / "build" / "refused" / "merged").exists()
    assert_nothing_half_written(Workspace(stores))
    return info.value


STACK = """merge:
  merge_method: passthrough
  base_model: a
  slices:
    - sources: [{model: a, layer_range: [0, 2]}]
    - sources: [{model: b, layer_range: [0, 2]}]
"""


def test_stacking_another_architecture_is_refused(stores: Path) -> None:
    a = make_model(stores / "a")
    b = make_model(stores / "b", config={"architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text"})
    exc = refusal(stores, {"a": a, "b": b}, STACK)
    assert exc.key == "merge.slices[1].sources[0]"
    assert exc.message.startswith("model 'b' is Qwen3_5ForCausalLM, the base 'a' is LlamaForCausalLM; ")
    assert "use models of one architecture" in exc.message
    # the same class name with another text model_type (e.g. a nested text_config) is another architecture too
    c = make_model(stores / "c", config={"text_config": {"model_type": "mistral"}})
    exc = refusal(stores, {"a": a, "b": c}, STACK)
    assert "model 'b' is LlamaForCausalLM (model_type mistral), the base 'a' is LlamaForCausalLM (model_type " \
           "llama)" in exc.message


def test_stacking_another_width_is_refused(stores: Path) -> None:
    a, b = make_model(stores / "a"), make_model(stores / "b", hidden=32)
    exc = refusal(stores, {"a": a, "b": b}, STACK)
    assert (exc.key, exc.message.split(";")[0]) == ("merge.slices[1].sources[0]",
                                                    "model 'b' has hidden size 32, the base 'a' has 16")


def test_a_layer_unlike_every_base_layer_is_refused(stores: Path) -> None:
    a = make_model(stores / "a")
    b = make_model(stores / "b", tensors={"model.layers.1.mlp.up_proj.weight": ("F32", (48, 16))})
    exc = refusal(stores, {"a": a, "b": b}, STACK)
    assert exc.key == "merge.slices[1].sources[0]"
    assert exc.message.startswith("layer 1 of model 'b' matches no layer of the base 'a' (against the nearest, "
                                  "layer 0: its mlp.up_proj.weight is [48, 16], not [32, 16]); ")
    exc = refusal(stores, {"a": a, "b": b}, """merge:
  merge_method: linear
  models: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]
""")
    assert exc.key == "merge.models[1]" and exc.message.startswith("layer 1 of model 'b' matches no layer")
    # a layer that is not used is not compared
    run_merge(stores, "ok", recipe_text({"a": a, "b": b}, STACK.replace("{model: b, layer_range: [0, 2]}",
                                                                         "{model: b, layer_range: [0, 1]}")))


def test_vocabulary_size_matters_only_where_embeddings_or_lm_head_are_taken(stores: Path) -> None:
    a, b = make_model(stores / "a"), make_model(stores / "b", vocab=48)
    exc = refusal(stores, {"a": a, "b": b}, """merge:
  merge_method: linear
  models: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]
""")
    assert exc.key == "merge.models[1]" and exc.message.startswith("model 'b' has vocab_size 48, the first model "
                                                                   "'a' has 32; merged models need one vocabulary")
    no_base = STACK.replace("  base_model: a\n", "")
    exc = refusal(stores, {"a": a, "b": b}, no_base)
    assert "takes the embeddings from the first slice's model and the final norm and lm_head from the last " \
           "slice's, as mergekit does: name a base_model" in exc.message
    out = run_merge(stores, "ok", recipe_text({"a": a, "b": b}, STACK))      # b gives layers only
    assert raw_tensors(out)["lm_head.weight"] == raw_tensors(a)["lm_head.weight"]
    c = make_model(stores / "c", tensors={"model.embed_tokens.weight": ("F32", (40, 16))})
    exc = refusal(stores, {"a": a, "b": c}, no_base.replace("model: b, layer_range: [0, 2]",
                                                            "model: b, layer_range: [0, 1]"))
    assert exc.message.startswith("model 'b' has 40 embedding rows (model.embed_tokens.weight), the first model "
                                  "'a' has 32; ")


def hybrid(dest: Path, seed: int, types: list[str], mixer: str = "linear_attn") -> Path:
    """A hybrid model: 'linear' layers have a linear-attention mixer in place of self_attn."""
    tensors: dict[str, tuple[str, tuple[int, ...]] | None] = {}
    for i, kind in enumerate(types):
        if kind == "linear":
            tensors.update({f"model.layers.{i}.self_attn.{p}_proj.weight": None for p in "qkvo"})
            tensors.update({f"model.layers.{i}.{mixer}.in_proj.weight": ("F32", (48, 16)),
                            f"model.layers.{i}.{mixer}.out_proj.weight": ("F32", (16, 16))})
    layer_types = ["linear_attention" if kind == "linear" else "full_attention" for kind in types]
    return make_model(dest, seed, layers=len(types), tensors=tensors, config={"layer_types": layer_types})


def test_hybrid_layers_are_compared_with_their_own_kind(stores: Path) -> None:
    a = hybrid(stores / "a", 1, ["linear", "linear", "full"])
    b = hybrid(stores / "b", 2, ["linear", "full", "linear"])
    out = run_merge(stores, "hybrid", recipe_text({"a": a, "b": b}, """merge:
  merge_method: passthrough
  slices:
    - sources: [{model: a, layer_range: [0, 3]}]
    - sources: [{model: b, layer_range: [1, 3]}]
"""))
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["linear_attention", "linear_attention", "full_attention", "full_attention",
                                     "linear_attention"]
    merged, rb = raw_tensors(out), raw_tensors(b)
    assert merged["model.layers.3.self_attn.q_proj.weight"] == rb["model.layers.1.self_attn.q_proj.weight"]
    assert merged["model.layers.4.linear_attn.in_proj.weight"] == rb["model.layers.2.linear_attn.in_proj.weight"]
    c = hybrid(stores / "c", 3, ["linear", "full", "linear"], mixer="mamba")
    exc = refusal(stores, {"a": a, "b": c}, """merge:
  merge_method: passthrough
  slices:
    - sources: [{model: a, layer_range: [0, 3]}]
    - sources: [{model: b, layer_range: [0, 2]}]
""")
    assert exc.key == "merge.slices[1].sources[0]"
    assert exc.message.startswith("layer 0 of model 'b' matches no layer of the first model 'a' (against the "
                                  "nearest, layer 0: it lacks linear_attn.in_proj.weight, it lacks "
                                  "linear_attn.out_proj.weight, it has mamba.in_proj.weight [48, 16], which that "
                                  "layer lacks, and 1 more); ")


PREFLIGHT_WITHOUT_TORCH = """
import sys
from steps.errors import RecipeError
from steps.plan import plan
from steps.recipe import load
from steps.store import execute
stages = {s.kind: s for s in plan(load(sys.argv[1]))}
execute(stages["fetch"])
try:
    execute(stages["merge"])
except RecipeError as exc:
    print("refused:", exc.key)
print("torch imported:", "torch" in sys.modules)
"""


def test_preflight_refuses_without_torch_and_doit_prints_one_line(workspace: Workspace, tmp_path: Path) -> None:
    a = make_model(tmp_path / "a")
    b = make_model(tmp_path / "b", config={"architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text"})
    recipe = workspace.write_recipe("r", recipe_text({"a": a, "b": b}, STACK))
    proc = subprocess.run([sys.executable, "-c", PREFLIGHT_WITHOUT_TORCH, str(recipe)], cwd=ROOT,
                          env=workspace.env(), capture_output=True, text=True, timeout=300)
    assert proc.stdout.splitlines() == ["refused: merge.slices[1].sources[0]", "torch imported: False"], proc.stderr
    assert_refused(workspace, "r.yaml: merge.slices[1].sources[0]: model 'b' is Qwen3_5ForCausalLM, the base 'a' "
                   "is LlamaForCausalLM", args=("merge:r",))
