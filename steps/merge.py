"""merge: the recipe's merge block (mergekit syntax) as a streamed, sharded safetensors model.

The engine finds the decoder-layer blocks from tensor names and the config's layer count (``model.layers.N``,
``model.language_model.layers.N``, ``transformer.h.N``, ...), not from an architecture table. Every other module
(embeddings, final norm, lm_head, vision tower, MTP heads) comes from the base model; a passthrough without
base_model takes them as mergekit does (embeddings from the first slice's model, the rest from the last slice's).
The config is rewritten for the new depth: the layer count (nested ``text_config`` too) and every per-layer list
such as ``layer_types``. Every input tensor is either placed in the output or listed in the stage's record as
deliberately left out.

A preflight compares the models from their configs and headers before any byte is written (architecture, width,
vocabulary, each layer's tensors). Tensors stream one at a time; an unchanged tensor is copied as bytes, never
decoded, and so is every integer or boolean buffer (position ids, masks), which no method merges.

    python -m steps.merge demo                   # run the merge stage of recipes/demo.yaml
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps import constants as C
from steps.errors import RecipeError
from steps.fetch import source_dir
from steps.hashing import digest_value
from steps.methods import LAYERED, Method, layer_position, resolve
from steps.methods import get as get_method
from steps.recipe import TEXT_CONFIGS, source_layer_count
from steps.tensors import MERGEABLE, TORCH_DTYPES, ModelReader, OutTensor, write_model

if TYPE_CHECKING:
    from steps.store import Context

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
SKIP_FILES = ("config.json", "README.md", "manifest.json")
_LAYER_RE = re.compile(r"^(.*?)\.(\d+)\.(.+)$")
TOWER_CONFIGS = ("vision_config", "audio_config")     # sub-configs of modules beside the decoder
EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings")   # token embedding names


def find_layer_prefix(names: list[str], n_layers: int) -> str:
    """The tensor-name prefix of the decoder layers: the prefix whose indices are exactly 0..n_layers-1."""
    indices: dict[str, set[int]] = {}
    counts: Counter[str] = Counter()
    for name in names:
        m = _LAYER_RE.match(name)
        if m:
            indices.setdefault(m.group(1), set()).add(int(m.group(2)))
            counts[m.group(1)] += 1
    candidates = [p for p, idx in indices.items() if idx == set(range(n_layers))]
    if not candidates:
        seen = ", ".join(f"{p} ({len(i)})" for p, i in sorted(indices.items())) or "none"
        raise ValueError(f"no tensor prefix has exactly {n_layers} numbered blocks (the config's layer count); "
                         f"numbered prefixes seen: {seen}")
    aside = ("visual", "vision", "mtp", "encoder")
    return max(candidates, key=lambda p: ("layers" in p, not any(a in p for a in aside), counts[p]))


@dataclass(frozen=True)
class Model:
    name: str
    directory: Path
    reader: ModelReader
    config: dict[str, Any]
    n_layers: int
    prefix: str

    @classmethod
    def open(cls, name: str, directory: Path) -> Model:
        reader = ModelReader(directory)
        n_layers = source_layer_count(directory)
        if n_layers is None:
            raise ValueError(f"{directory}/config.json has no num_hidden_layers")
        prefix = find_layer_prefix(list(reader.tensors), n_layers)
        return cls(name, directory, reader, json.loads((directory / "config.json").read_text()), n_layers, prefix)


@dataclass(frozen=True)
class SliceSource:
    model: str
    start: int
    end: int
    params: dict[str, Any]


@dataclass(frozen=True)
class Slice:
    sources: list[SliceSource]
    params: dict[str, Any]


def normalize_slices(merge: dict[str, Any], models: dict[str, Model], base_name: str | None) -> list[Slice]:
    """mergekit's two spellings as one list of slices: ``slices:`` as written; ``models:`` as one slice of every
    model's full depth (the base appended when it is not listed); ``interleave`` as one-layer slices A0 B0 A1 B1."""
    method = merge["merge_method"]
    if "slices" in merge:
        return [Slice([SliceSource(src["model"], src["layer_range"][0], src["layer_range"][1],
                                   src.get("parameters") or {}) for src in sl["sources"]],
                      sl.get("parameters") or {}) for sl in merge["slices"]]
    entries = [(m["model"], m.get("parameters") or {}, m.get("layer_range")) for m in merge["models"]]
    if method == "interleave":
        ranges = [rng or [0, models[name].n_layers] for name, _, rng in entries]
        depth = min(end - start for start, end in ranges)
        return [Slice([SliceSource(name, rng[0] + i, rng[0] + i + 1, params)], {})
                for i in range(depth) for (name, params, _), rng in zip(entries, ranges, strict=True)]
    if base_name is not None and base_name not in [name for name, _, _ in entries]:
        entries.append((base_name, {}, None))
    full = [(name, params, rng or [0, models[name].n_layers]) for name, params, rng in entries]
    return [Slice([SliceSource(name, rng[0], rng[1], params) for name, params, rng in full], {})]


def check_ranges(slices: list[Slice], models: dict[str, Model], recipe_file: str) -> None:
    for s, sl in enumerate(slices):
        depths = {src.end - src.start for src in sl.sources}
        for j, src in enumerate(sl.sources):
            model = models[src.model]
            if not 0 <= src.start < src.end <= model.n_layers:
                raise RecipeError(recipe_file, f"merge.slices[{s}].sources[{j}].layer_range",
                                  f"[{src.start}, {src.end}] is outside model '{src.model}', which has "
                                  f"{model.n_layers} layers; use a range within [0, {model.n_layers}]")
        if len(depths) > 1:
            raise RecipeError(recipe_file, f"merge.slices[{s}].sources",
                              f"the sources span different numbers of layers ({sorted(depths)}); every source "
                              "of a slice needs a layer_range of the same length")


def preflight(merge: dict[str, Any], slices: list[Slice], models: dict[str, Model], base: Model,
              recipe_file: str) -> None:
    """Refuse models that cannot be stacked or merged together, before any output byte is written, from config.json
    and the safetensors headers alone (no torch: seconds on any model size). Every model a source names is compared
    with the base: its architecture (the text model's model_type) and hidden size; its vocabulary size where it gives
    modules outside the layers (embeddings, lm_head); and each layer it gives must match one of the base's layers
    tensor for tensor (names and shapes). Any base layer, not the one at the same index: each layer type of a hybrid
    model (linear and full attention, dense and MoE layers) then finds its own kind."""
    ref = f"the base '{base.name}'" if merge.get("base_model") else f"the first model '{base.name}'"
    if merge["merge_method"] not in LAYERED:
        donors = {src.model for sl in (slices[0], slices[-1]) for src in sl.sources}
        why = ("merged models need one vocabulary (mergekit's tokenizer-permutation merge is not implemented): use "
               "fine-tunes that keep the base's tokenizer")
    elif mergekit_passthrough(merge, base):
        donors = {slices[0].sources[0].model, slices[-1].sources[0].model}
        why = ("a passthrough without base_model takes the embeddings from the first slice's model and the final "
               "norm and lm_head from the last slice's, as mergekit does: name a base_model to take them all from it")
    else:
        donors, why = set(), ""
    base_layers = _layer_tensors(base)
    known = {frozenset(layer.items()) for layer in base_layers}
    for key, name, layers in _source_entries(merge, models):
        model = models[name]
        if name == base.name:
            continue
        problem = _model_difference(model, base, ref, why if name in donors else None)
        if problem:
            raise RecipeError(recipe_file, key, problem)
        own = _layer_tensors(model)
        for layer in layers:
            if frozenset(own[layer].items()) not in known:
                raise RecipeError(recipe_file, key, f"layer {layer} of model '{name}' matches no layer of {ref} "
                                  f"({_nearest_difference(own[layer], base_layers)}); stacked or merged layers "
                                  "need one architecture and width: use models of one family and size")


def _source_entries(merge: dict[str, Any], models: dict[str, Model]) -> list[tuple[str, str, range]]:
    """(recipe key, model, layers used) of every source the merge block names."""
    if "slices" in merge:
        return [(f"merge.slices[{s}].sources[{j}]", src["model"], range(*src["layer_range"]))
                for s, sl in enumerate(merge["slices"]) for j, src in enumerate(sl["sources"])]
    return [(f"merge.models[{k}]", m["model"], range(*(m.get("layer_range") or (0, models[m["model"]].n_layers))))
            for k, m in enumerate(merge["models"])]


def _text_value(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """The first of keys set in the text model's config (a nested text_config, else the config itself)."""
    for cfg in (config.get("text_config"), config):
        if isinstance(cfg, dict):
            for key in keys:
                if cfg.get(key) is not None:
                    return cfg[key]
    return None


def _architecture(config: dict[str, Any]) -> tuple[str, str]:
    """What must agree (the text model's model_type) and the name a message gives (the architecture class)."""
    model_type = _text_value(config, ("model_type",))
    archs = config.get("architectures")
    label = str(archs[0]) if isinstance(archs, list) and archs else str(model_type or "an unknown architecture")
    return str(model_type or label), label


def _embedding_rows(model: Model) -> tuple[str, int] | None:
    for name, info in model.reader.tensors.items():
        if not name.startswith(model.prefix + ".") and any(e in name for e in EMBEDDINGS) and len(info.shape) == 2:
            return name, info.shape[0]
    return None


def _model_difference(model: Model, base: Model, ref: str, vocab_why: str | None) -> str | None:
    """Why model cannot join the base (architecture, hidden size, and the vocabulary size when vocab_why says why
    it matters), or None."""
    (kind, label), (base_kind, base_label) = _architecture(model.config), _architecture(base.config)
    if kind != base_kind:
        if label == base_label:
            label, base_label = f"{label} (model_type {kind})", f"{base_label} (model_type {base_kind})"
        return (f"model '{model.name}' is {label}, {ref} is {base_label}; layers of different architectures do not "
                "fit together: use models of one architecture (fine-tunes of one base model)")
    width, base_width = (_text_value(m.config, ("hidden_size", "n_embd", "d_model")) for m in (model, base))
    if None not in (width, base_width) and width != base_width:
        return (f"model '{model.name}' has hidden size {width}, {ref} has {base_width}; layers of another width "
                "cannot be stacked or merged: use models of one size (fine-tunes of one base model)")
    if vocab_why is None:
        return None
    vocab, base_vocab = (_text_value(m.config, ("vocab_size",)) for m in (model, base))
    if None not in (vocab, base_vocab) and vocab != base_vocab:
        return f"model '{model.name}' has vocab_size {vocab}, {ref} has {base_vocab}; {vocab_why}"
    rows, base_rows = _embedding_rows(model), _embedding_rows(base)
    if rows and base_rows and rows[1] != base_rows[1]:
        return (f"model '{model.name}' has {rows[1]} embedding rows ({rows[0]}), {ref} has {base_rows[1]}; "
                f"{vocab_why}")
    return None


def _layer_tensors(model: Model) -> list[dict[str, tuple[int, ...]]]:
    """Per decoder layer, its tensors' names (after the layer index) and shapes."""
    layers: list[dict[str, tuple[int, ...]]] = [{} for _ in range(model.n_layers)]
    head = model.prefix + "."
    for name, info in model.reader.tensors.items():
        if name.startswith(head):
            index, _, suffix = name[len(head):].partition(".")
            if index.isdigit():
                layers[int(index)][suffix] = info.shape
    return layers


def _nearest_difference(layer: dict[str, tuple[int, ...]], base_layers: list[dict[str, tuple[int, ...]]]) -> str:
    """How a layer differs from the base layer it is closest to (the fewest differing tensors)."""
    differences = []
    for other in base_layers:
        found = []
        for suffix in sorted(layer.keys() | other.keys()):
            if suffix not in other:
                found.append(f"it has {suffix} {list(layer[suffix])}, which that layer lacks")
            elif suffix not in layer:
                found.append(f"it lacks {suffix}")
            elif layer[suffix] != other[suffix]:
                found.append(f"its {suffix} is {list(layer[suffix])}, not {list(other[suffix])}")
        differences.append(found)
    k = min(range(len(differences)), key=lambda i: len(differences[i]))
    more = f", and {len(differences[k]) - 3} more" if len(differences[k]) > 3 else ""
    return f"against the nearest, layer {k}: {', '.join(differences[k][:3])}{more}"


def _settings(merge: dict[str, Any], sl: Slice, src: SliceSource | None) -> list[dict[str, Any] | None]:
    """Parameter settings, most specific first: slice source > slice > merge block."""
    return [src.params if src is not None else None, sl.params, merge.get("parameters")]


def _compute_dtype(merge: dict[str, Any], infos: list[Any]) -> str:
    if merge.get("dtype"):
        return TORCH_DTYPES[merge["dtype"]]
    if len({info.dtype for info in infos}) == 1:
        return str(infos[0].dtype)
    import torch
    by_name = {v: getattr(torch, k) for k, v in TORCH_DTYPES.items()}
    promoted = by_name[infos[0].dtype]
    for info in infos[1:]:
        promoted = torch.promote_types(promoted, by_name[info.dtype])
    return {getattr(torch, k): v for k, v in TORCH_DTYPES.items()}[promoted]


def layered_plan(merge: dict[str, Any], slices: list[Slice], models: dict[str, Model], base: Model,
                 recipe_file: str) -> tuple[list[OutTensor], list[tuple[str, int]]]:
    """passthrough and interleave: whole layers in slice order. The modules outside the layers come from the base;
    for a passthrough without base_model, as in mergekit, the embeddings come from the first slice's model and the
    rest (final norm, lm_head) from the last slice's, each scaled by its slice source's ``scale``."""
    tensors: list[OutTensor] = []
    layer_sources: list[tuple[str, int]] = []
    for s, sl in enumerate(slices):
        if len(sl.sources) != 1:
            raise RecipeError(recipe_file, f"merge.slices[{s}].sources", f"{merge['merge_method']} takes exactly "
                              "one source per slice")
        src = sl.sources[0]
        model = models[src.model]
        for layer in range(src.start, src.end):
            out_layer = len(layer_sources)
            layer_sources.append((src.model, layer))
            t = layer_position(layer - src.start, src.end - src.start)
            head = f"{model.prefix}.{layer}."
            for name in model.reader.tensors:
                if name.startswith(head):
                    out_name = f"{base.prefix}.{out_layer}.{name[len(head):]}"
                    scale = resolve("scale", _settings(merge, sl, src), out_name, t, None)
                    tensors.append(_copy_tensor(merge, model, name, out_name, scale))
    mergekit_ends = mergekit_passthrough(merge, base)
    for name, info in base.reader.tensors.items():
        if name.startswith(base.prefix + "."):
            continue
        if not mergekit_ends or info.dtype not in MERGEABLE:
            tensors.append(_copy_tensor(merge, base, name, name, None))
            continue
        s = 0 if _is_pre(name) else len(slices) - 1
        src = slices[s].sources[0]
        if name not in models[src.model].reader.tensors:
            raise RecipeError(recipe_file, f"merge.slices[{s}].sources[0]",
                              f"model '{src.model}' has no tensor {name}, which a passthrough without base_model "
                              "takes from the last slice's model (as mergekit does); name a base_model to take "
                              "every module outside the layers from it")
        scale = resolve("scale", _settings(merge, slices[s], src), name, 0.0, None)
        tensors.append(_copy_tensor(merge, models[src.model], name, name, scale))
    return tensors, layer_sources


def mergekit_passthrough(merge: dict[str, Any], base: Model) -> bool:
    """Whether a layered merge takes the modules outside the layers as mergekit's passthrough does (first and last
    slice): a passthrough without base_model of a text-only model. mergekit 0.1.5 refuses ``slices:`` on a model
    with a vision or audio tower, so such a model, interleave and a named base_model take them from the base."""
    towers = any(isinstance(base.config.get(key), dict) for key in TOWER_CONFIGS)
    return merge["merge_method"] == "passthrough" and merge.get("base_model") is None and not towers


def _copy_tensor(merge: dict[str, Any], model: Model, name: str, out_name: str, scale: float | None) -> OutTensor:
    info = model.reader.tensors[name]
    dtype = _compute_dtype(merge, [info])
    out_dtype = TORCH_DTYPES[merge["out_dtype"]] if merge.get("out_dtype") else dtype
    inputs = ((model.name, name),)
    if info.dtype not in MERGEABLE or info.dtype == out_dtype == dtype and scale is None:
        # the bytes as they are: an unchanged tensor, or an integer or boolean buffer (never converted or scaled)
        return OutTensor(out_name, info.dtype, info.shape, lambda: model.reader.raw(name), inputs)

    def convert() -> Any:
        t = model.reader.tensor(name).to(_torch_dtype(dtype))
        if scale is not None:
            t = t * scale
        return _to_bytes(t, out_dtype)

    return OutTensor(out_name, out_dtype, info.shape, convert, inputs)


def _torch_dtype(code: str) -> Any:
    import torch
    return getattr(torch, {v: k for k, v in TORCH_DTYPES.items()}[code])


def _to_bytes(t: Any, out_dtype: str) -> Any:
    """The tensor's bytes as a buffer (a uint8 view: no copy)."""
    import torch
    return t.to(_torch_dtype(out_dtype)).contiguous().reshape(-1).view(torch.uint8).numpy()


def _is_pre(name: str) -> bool:
    return any(k in name for k in ("embed", "wte", "wpe"))


def tensorwise_plan(merge: dict[str, Any], method: Method, slices: list[Slice], models: dict[str, Model],
                    base: Model, base_name: str | None, recipe_file: str
                    ) -> tuple[list[OutTensor], list[tuple[str, int]]]:
    """Every other method: each output tensor merges the same tensor of every source of its slice."""
    tensors: list[OutTensor] = []
    layer_sources: list[tuple[str, int]] = []
    for s, sl in enumerate(slices):
        names = [src.model for src in sl.sources]
        if method.base == "required" and base_name not in names:
            raise RecipeError(recipe_file, f"merge.slices[{s}].sources", f"{method.name} needs the base model "
                              f"'{base_name}' among the sources of every slice")
        if method.n_inputs is not None and len(sl.sources) != method.n_inputs:
            raise RecipeError(recipe_file, f"merge.slices[{s}].sources", f"{method.name} merges exactly "
                              f"{method.n_inputs} models, got {len(sl.sources)}")
        depth = sl.sources[0].end - sl.sources[0].start
        for i in range(depth):
            out_layer = len(layer_sources)
            layer_sources.append((sl.sources[0].model, sl.sources[0].start + i))
            first = models[sl.sources[0].model]
            head = f"{first.prefix}.{sl.sources[0].start + i}."
            for name in first.reader.tensors:
                if name.startswith(head):
                    suffix = name[len(head):]
                    inputs = [(src, f"{models[src.model].prefix}.{src.start + i}.{suffix}") for src in sl.sources]
                    tensors.append(_merged_tensor(merge, method, sl, inputs, models, base_name,
                                                  f"{base.prefix}.{out_layer}.{suffix}",
                                                  layer_position(i, depth), recipe_file, s))
    for name, info in base.reader.tensors.items():
        if name.startswith(base.prefix + "."):
            continue
        if info.dtype not in MERGEABLE:
            tensors.append(_copy_tensor(merge, base, name, name, None))
            continue
        sl = slices[0] if _is_pre(name) else slices[-1]
        inputs = [(src, name) for src in sl.sources]
        tensors.append(_merged_tensor(merge, method, sl, inputs, models, base_name, name, 0.0, recipe_file,
                                      0 if _is_pre(name) else len(slices) - 1))
    return tensors, layer_sources


def _merged_tensor(merge: dict[str, Any], method: Method, sl: Slice, inputs: list[tuple[SliceSource, str]],
                   models: dict[str, Model], base_name: str | None, out_name: str, t: float, recipe_file: str,
                   s: int) -> OutTensor:
    present = [(src, name) for src, name in inputs if name in models[src.model].reader.tensors]
    if any(models[src.model].reader.tensors[name].dtype not in MERGEABLE for src, name in present):
        # an integer or boolean buffer in a layer: the bytes of the slice's base (else first) model
        src, name = next(((src, name) for src, name in present if src.model == base_name), present[0])
        return _copy_tensor(merge, models[src.model], name, out_name, None)
    missing = [f"'{src.model}'" for src, name in inputs if name not in models[src.model].reader.tensors]
    if missing and (base_name in [src.model for src, _ in present] or method.base != "required"):
        if len(present) == 1 and method.name in ("slerp", "nuslerp", "model_stock"):
            src, name = present[0]
            return _copy_tensor(merge, models[src.model], name, out_name, None)
    if missing and (method.base == "required" and base_name not in [src.model for src, _ in present]):
        raise RecipeError(recipe_file, f"merge.slices[{s}]", f"tensor {inputs[0][1]} is missing from the base "
                          f"model '{base_name}'")
    infos = [models[src.model].reader.tensors[name] for src, name in present]
    shapes = {info.shape for info in infos}
    if len(shapes) > 1:
        detail = ", ".join(f"'{src.model}' {list(info.shape)}" for (src, _), info in zip(present, infos, strict=True))
        raise RecipeError(recipe_file, f"merge.slices[{s}]", f"tensor {inputs[0][1]} has different shapes: {detail}; "
                          "merged models need one architecture and vocabulary size")
    dtype = _compute_dtype(merge, infos)
    out_dtype = TORCH_DTYPES[merge["out_dtype"]] if merge.get("out_dtype") else dtype
    base_index = next((k for k, (src, _) in enumerate(present) if src.model == base_name), None)
    if method.base == "ignored":
        base_index = None
    per_model = []
    for k, (src, _) in enumerate(present):
        wanted = {p: d for p, d in method.per_model.items() if not (k == base_index and p in method.non_base_only)}
        try:
            per_model.append({p: resolve(p, _settings(merge, sl, src), out_name, t, d) for p, d in wanted.items()})
        except KeyError as exc:
            raise RecipeError(recipe_file, f"merge: model '{src.model}' parameters.{exc.args[0]}",
                              f"{method.name} needs {exc.args[0]} for every model; set it on the model, the slice "
                              "or the merge block's parameters") from None
    try:
        shared = {p: resolve(p, _settings(merge, sl, None), out_name, t, d) for p, d in method.shared.items()}
    except KeyError as exc:
        raise RecipeError(recipe_file, f"merge.parameters.{exc.args[0]}",
                          f"{method.name} needs {exc.args[0]}; set it in the slice or the merge block's "
                          "parameters") from None
    seed = int(merge.get("random_seed", 0))

    device = merge_device()

    def compute() -> Any:
        import torch
        xs = [models[src.model].reader.tensor(name).to(device=device, dtype=_torch_dtype(dtype))
              for src, name in present]
        gens = None
        if method.random:
            gens = [torch.Generator(device=device).manual_seed(_seed(seed, out_name, src.model)) for src, _ in present]
        with torch.device(device):
            merged = method.fn(xs, base_index, per_model, shared, gens)
        return _to_bytes(merged.cpu(), out_dtype)

    return OutTensor(out_name, out_dtype, infos[0].shape, compute,
                     tuple((src.model, name) for src, name in present))


def merge_device() -> str:
    """MERGEFORGE_MERGE_DEVICE (e.g. cuda) computes the arithmetic methods there; the default is the CPU."""
    return os.environ.get("MERGEFORGE_MERGE_DEVICE", "cpu")


def _seed(seed: int, tensor: str, model: str) -> int:
    return int(digest_value([seed, tensor, model])[:15], 16)


def rewrite_config(base: Model, models: dict[str, Model], layer_sources: list[tuple[str, int]],
                   dtype: str) -> dict[str, Any]:
    """The base config for the new depth: the layer count and every per-layer list follow the slices, in the config
    that owns the stacked layers only (the top level, or a multimodal model's text config), never in a vision or
    audio config, whatever its numbers."""
    config = json.loads(json.dumps(base.config))
    n_out = len(layer_sources)
    for path in ([], *([key] for key in TEXT_CONFIGS if isinstance(config.get(key), dict))):
        cfg = config
        for part in path:
            cfg = cfg[part]
        count_keys = [k for k in ("num_hidden_layers", "n_layer", "num_layers") if cfg.get(k) == base.n_layers]
        if not count_keys:
            continue
        for k in count_keys:
            cfg[k] = n_out
        for key, value in list(cfg.items()):
            if isinstance(value, list) and len(value) == base.n_layers and base.n_layers > 1:
                cfg[key] = [_source_list(models[m].config, path, key)[i] for m, i in layer_sources]
    for cfg in (config, *(config.get(key) for key in TEXT_CONFIGS)):
        if isinstance(cfg, dict):
            if "torch_dtype" in cfg:
                cfg["torch_dtype"] = dtype
            if "dtype" in cfg and isinstance(cfg["dtype"], str):
                cfg["dtype"] = dtype
    return config


def _source_list(config: dict[str, Any], path: list[str], key: str) -> list[Any]:
    for part in path:
        config = config[part]
    return list(config[key])


def copy_tokenizer(source: Path, dest: Path) -> list[str]:
    from steps.hashing import model_files
    copied = []
    for path in model_files(source):
        if path.parent == source and path.name not in SKIP_FILES and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(path, dest / path.name)
            copied.append(path.name)
    return copied


def build(ctx: Context) -> None:
    stage, merge = ctx.stage, ctx.stage.params
    recipe_file = str(stage.recipe.file)
    entries = merge["slices"] if "slices" in merge else [{"sources": merge["models"]}]
    names = list(dict.fromkeys(src["model"] for sl in entries for src in sl["sources"]))
    base_name = merge.get("base_model")
    if base_name is not None and base_name not in names:
        names.append(base_name)
    models = {}
    for n in names:
        try:
            models[n] = Model.open(n, source_dir(stage, n))
        except (ValueError, FileNotFoundError) as exc:
            raise RecipeError(recipe_file, f"sources.{n}", f"cannot merge model '{n}': {exc}") from None
    base = models[base_name or names[0]]
    method_name = merge["merge_method"]
    try:
        slices = normalize_slices(merge, models, base_name)
        check_ranges(slices, models, recipe_file)
        preflight(merge, slices, models, base, recipe_file)
        if method_name in LAYERED:
            tensors, layer_sources = layered_plan(merge, slices, models, base, recipe_file)
        else:
            tensors, layer_sources = tensorwise_plan(merge, get_method(method_name), slices, models, base,
                                                     base_name, recipe_file)
        used: dict[str, set[str]] = {m: set() for m in models}
        for t in tensors:
            for m, name in t.inputs:
                used[m].add(name)
        left_out = {m: sorted(set(models[m].reader.tensors) - used[m]) for m in models}
        out = ctx.out / C.MERGED_DIR
        out.mkdir()
        total = sum(t.nbytes for t in tensors)
        logger.info("merge %s (%s): %d tensors, %d layers, %.2f GB", stage.recipe.name, method_name, len(tensors),
                    len(layer_sources), total / 1e9)
        with _progress(total, f"merge {stage.recipe.name}") as advance:
            shards = write_model(out, tensors, int(merge.get("shard_bytes", C.DEFAULT_SHARD_BYTES)), advance)
    finally:
        for m in models.values():
            m.reader.close()
    out_dtype = merge.get("out_dtype") or merge.get("dtype") or _dtype_name(base)
    config = rewrite_config(base, models, layer_sources, out_dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok_name = merge.get("tokenizer_source") or merge.get("tokenizer") or base.name
    tok_name = base.name if tok_name == "base" else tok_name
    copied = copy_tokenizer(models[tok_name].directory if tok_name in models else source_dir(stage, tok_name), out)
    if merge.get("chat_template") not in (None, "auto"):
        (out / "chat_template.jinja").write_text(merge["chat_template"])
    ctx.record["merge"] = {"method": method_name, "layers": len(layer_sources),
                           "layer_sources": [f"{m}:{i}" for m, i in layer_sources], "shards": shards,
                           "tokenizer_files": copied, "left_out": {m: v for m, v in left_out.items() if v}}


def _dtype_name(model: Model) -> str:
    first = next((info.dtype for info in model.reader.tensors.values() if info.dtype in MERGEABLE), "BF16")
    return {v: k for k, v in TORCH_DTYPES.items()}[first]


class _progress:
    """A tqdm bar on a terminal, nothing otherwise."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc = total, desc
        self.bar: Any = None

    def __enter__(self) -> Any:
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, desc=self.desc, unit="B", unit_scale=True)
            return self.bar.update
        return None

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    from steps.plan import find
    from steps.store import execute
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    execute(find(f"merge:{sys.argv[1]}"))
