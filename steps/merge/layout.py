"""The merge's layout: where the decoder blocks are, the slices, the preflight that compares the models before
any byte is written, and the layered plan (passthrough, interleave): which source tensor becomes which output."""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.errors import RecipeError
from steps.methods import LAYERED, layer_position, resolve
from steps.tensors import (MERGEABLE, TORCH_DTYPES, ModelReader, OutTensor, source_layer_count)

if TYPE_CHECKING:
    pass

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
