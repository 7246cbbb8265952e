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
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps import constants as C
from steps import settings
from steps.errors import RecipeError
from steps.fetch import source_dir
from steps.merge.layout import (SKIP_FILES, WEIGHT_SUFFIXES, Model, Slice, SliceSource, check_ranges, find_layer_prefix,
                                 layered_plan, normalize_slices, preflight)
from steps.merge.tensorwise import tensorwise_plan
from steps.stage import Declaration
from steps.methods import LAYERED
from steps.methods import get as get_method
from steps.tensors import (MERGEABLE, TEXT_CONFIGS, TORCH_DTYPES, source_layer_count, write_model)

if TYPE_CHECKING:
    from steps.stage import Context, Stage

__all__ = ["STAGE", "Model", "Slice", "SliceSource", "build", "check", "check_ranges", "copy_tokenizer",
           "estimate_bytes", "find_layer_prefix", "layered_plan", "normalize_slices", "preflight", "rewrite_config",
           "tensorwise_plan", "tools"]

logger = logging.getLogger(__name__)



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


def _open_models(stage: Stage) -> tuple[dict[str, Model], str | None]:
    """Every model the merge reads, opened from its headers (no tensor data), and the base model's name."""
    merge, recipe_file = stage.params, str(stage.recipe.file)
    entries = merge["slices"] if "slices" in merge else [{"sources": merge["models"]}]
    names = list(dict.fromkeys(src["model"] for sl in entries for src in sl["sources"]))
    base_name = merge.get("base_model")
    if base_name is not None and base_name not in names:
        names.append(base_name)
    models: dict[str, Model] = {}
    try:
        for n in names:
            try:
                models[n] = Model.open(n, source_dir(stage, n))
            except (ValueError, FileNotFoundError) as exc:
                raise RecipeError(recipe_file, f"sources.{n}", f"cannot merge model '{n}': {exc}") from None
    except BaseException:
        for m in models.values():
            m.reader.close()
        raise
    return models, base_name


def _checked_slices(stage: Stage, models: dict[str, Model], base_name: str | None) -> list[Slice]:
    merge, recipe_file = stage.params, str(stage.recipe.file)
    slices = normalize_slices(merge, models, base_name)
    check_ranges(slices, models, recipe_file)
    preflight(merge, slices, models, models[base_name or next(iter(models))], recipe_file)
    return slices


def check(stage: Stage, inputs: dict[str, dict[str, Any]]) -> None:
    """The late check: the fetched models can be merged as the recipe says (ranges, architectures, each layer's
    tensors), from their headers alone, before any space is asked for or anything is written."""
    models, base_name = _open_models(stage)
    try:
        _checked_slices(stage, models, base_name)
    finally:
        for m in models.values():
            m.reader.close()


def build(ctx: Context) -> None:
    stage, merge = ctx.stage, ctx.stage.params
    recipe_file = str(stage.recipe.file)
    models, base_name = _open_models(stage)
    names = list(models)
    base = models[base_name or names[0]]
    method_name = merge["merge_method"]
    try:
        slices = _checked_slices(stage, models, base_name)
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
        out = ctx.out / stage.outputs[0].split("/", 1)[0]     # merged/ (in a sweep's cell: merged@<cell>/)
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


def estimate_bytes(stage: Stage, inputs: dict[str, dict[str, Any]]) -> int:
    """The largest source's weights scaled by the output's layer count (the sum of the sources for interleave)."""
    merge = stage.params
    entries = merge["slices"] if "slices" in merge else [{"sources": merge["models"]}]
    names = list(dict.fromkeys(src["model"] for sl in entries for src in sl["sources"]))
    base = merge.get("base_model") or names[0]
    if base not in names:
        names.append(base)
    sizes = {name: sum(p.stat().st_size for p in source_dir(stage, name).glob("*.safetensors")) for name in names}
    if merge["merge_method"] == "interleave":
        return sum(sizes.values())
    if "slices" in merge:
        layers = source_layer_count(source_dir(stage, base))
        if layers:
            out_layers = sum(sl["sources"][0]["layer_range"][1] - sl["sources"][0]["layer_range"][0]
                             for sl in merge["slices"])
            return int(sizes[base] * out_layers / layers)
    return max(sizes.values())


def tools(stage: Stage) -> dict[str, str]:
    """Another device's arithmetic (and random stream) gives other bytes: another build."""
    device = settings.merge_device()
    return {"merge_device": device} if device != "cpu" else {}


STAGE = Declaration(build=build, estimate_bytes=estimate_bytes, tools=tools, check=check)
