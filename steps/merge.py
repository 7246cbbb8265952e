"""merge: the recipe's merge block (mergekit syntax) as a streamed, sharded safetensors model.

The engine finds the decoder-layer blocks from tensor names and the config's layer count (``model.layers.N``,
``model.language_model.layers.N``, ``transformer.h.N``, ...), not from an architecture table. Every other module
(embeddings, final norm, lm_head, vision tower, MTP heads) comes from the base model. The config is rewritten for
the new depth: the layer count (nested ``text_config`` too) and every per-layer list such as ``layer_types``.
Every input tensor is either placed in the output or listed in the stage's record as deliberately left out.

Tensors stream one at a time; an unchanged tensor is copied as bytes, never decoded.

    python -m steps.merge demo                   # run the merge stage of recipes/demo.yaml
"""
from __future__ import annotations

import json
import logging
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
from steps.recipe import source_layer_count
from steps.tensors import TORCH_DTYPES, ModelReader, OutTensor, write_model

if TYPE_CHECKING:
    from steps.store import Context

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
SKIP_FILES = ("config.json", "README.md", "manifest.json")
_LAYER_RE = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


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


def _slices(merge: dict[str, Any]) -> list[tuple[str, int, int, float]]:
    out = []
    for sl in merge["slices"]:
        src = sl["sources"][0]
        scale = (src.get("parameters") or {}).get("scale", 1.0)
        out.append((src["model"], src["layer_range"][0], src["layer_range"][1], float(scale)))
    return out


def passthrough_plan(merge: dict[str, Any], models: dict[str, Model], base: Model, recipe_file: str
                     ) -> tuple[list[OutTensor], list[tuple[str, int]], dict[str, list[str]]]:
    """Output tensors in order, the (model, layer) behind each output layer, and the tensors left out."""
    out_dtype = TORCH_DTYPES[merge.get("out_dtype") or merge["dtype"]]
    tensors: list[OutTensor] = []
    layer_sources: list[tuple[str, int]] = []
    used: dict[str, set[str]] = {name: set() for name in models}
    base_layer_shapes = {name[len(base.prefix) + 1:].partition(".")[2]: info.shape
                         for name, info in base.reader.tensors.items() if name.startswith(base.prefix + ".")}
    slices = _slices(merge)
    for s, (model_name, start, end, scale) in enumerate(slices):
        model = models[model_name]
        if end > model.n_layers:
            raise RecipeError(recipe_file, f"merge.slices[{s}].sources[0].layer_range",
                              f"[{start}, {end}] is outside model '{model_name}', which has {model.n_layers} "
                              f"layers; use a range within [0, {model.n_layers}]")
        for layer in range(start, end):
            out_layer = len(layer_sources)
            layer_sources.append((model_name, layer))
            head = f"{model.prefix}.{layer}."
            for name, info in model.reader.tensors.items():
                if not name.startswith(head):
                    continue
                suffix = name[len(head):]
                if base_layer_shapes.get(suffix, info.shape) != info.shape:
                    raise RecipeError(recipe_file, f"merge.slices[{s}]",
                                      f"model '{model_name}' tensor {name} has shape {list(info.shape)}, the base "
                                      f"model's layers have {list(base_layer_shapes[suffix])}; passthrough needs "
                                      "models of one architecture and width")
                used[model_name].add(name)
                tensors.append(_out_tensor(model, name, f"{base.prefix}.{out_layer}.{suffix}", out_dtype, scale))
    for name in base.reader.tensors:
        if not name.startswith(base.prefix + "."):
            used[base.name].add(name)
            tensors.append(_out_tensor(base, name, name, out_dtype, 1.0))
    left_out = {m: sorted(set(models[m].reader.tensors) - used[m]) for m in models}
    return tensors, layer_sources, {m: names for m, names in left_out.items() if names}


def _out_tensor(model: Model, name: str, out_name: str, out_dtype: str, scale: float) -> OutTensor:
    info = model.reader.tensors[name]
    if info.dtype == out_dtype and scale == 1.0:
        return OutTensor(out_name, out_dtype, info.shape, lambda: model.reader.raw(name))
    torch_dtype = {v: k for k, v in TORCH_DTYPES.items()}[out_dtype]

    def convert() -> bytes:
        import torch
        t = model.reader.tensor(name)
        if scale != 1.0:
            t = t.to(torch.float32) * scale
        return t.to(getattr(torch, torch_dtype)).contiguous().view(torch.uint8).numpy().tobytes()

    return OutTensor(out_name, out_dtype, info.shape, convert)


def rewrite_config(base: Model, models: dict[str, Model], layer_sources: list[tuple[str, int]],
                   dtype: str) -> dict[str, Any]:
    """The base config for the new depth: layer counts and every per-layer list follow the slices."""
    config = json.loads(json.dumps(base.config))
    n_out = len(layer_sources)

    def fix(cfg: dict[str, Any], path: list[str]) -> None:
        if not isinstance(cfg, dict):
            return
        count_keys = [k for k in ("num_hidden_layers", "n_layer", "num_layers") if cfg.get(k) == base.n_layers]
        if count_keys:
            for k in count_keys:
                cfg[k] = n_out
            for key, value in list(cfg.items()):
                if isinstance(value, list) and len(value) == base.n_layers and base.n_layers > 1:
                    cfg[key] = [_source_list(models[m].config, path, key)[i] for m, i in layer_sources]
        for key, value in cfg.items():
            if isinstance(value, dict) and key.endswith("_config"):
                fix(value, [*path, key])

    fix(config, [])
    for cfg in (config, config.get("text_config")):
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
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in SKIP_FILES and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(path, dest / path.name)
            copied.append(path.name)
    return copied


def build(ctx: Context) -> None:
    stage, merge = ctx.stage, ctx.stage.params
    recipe_file = str(stage.recipe.file)
    names = list(dict.fromkeys(sl["sources"][0]["model"] for sl in merge["slices"]))
    base_name = merge.get("base_model") or names[0]
    if base_name not in names:
        names.insert(0, base_name)
    models = {n: Model.open(n, source_dir(stage, n)) for n in names}
    base = models[base_name]
    try:
        tensors, layer_sources, left_out = passthrough_plan(merge, models, base, recipe_file)
        out = ctx.out / C.MERGED_DIR
        out.mkdir()
        total = sum(t.nbytes for t in tensors)
        logger.info("merge %s: %d tensors, %d layers, %.2f GB", stage.recipe.name, len(tensors),
                    len(layer_sources), total / 1e9)
        with _progress(total, f"merge {stage.recipe.name}") as advance:
            shards = write_model(out, tensors, int(merge.get("shard_bytes", C.DEFAULT_SHARD_BYTES)), advance)
    finally:
        for m in models.values():
            m.reader.close()
    config = rewrite_config(base, models, layer_sources, merge.get("out_dtype") or merge["dtype"])
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok_name = merge.get("tokenizer_source") or merge.get("tokenizer") or base_name
    tok_name = base_name if tok_name == "base" else tok_name
    copied = copy_tokenizer(models[tok_name].directory if tok_name in models else source_dir(stage, tok_name), out)
    if isinstance(merge.get("chat_template"), str):
        (out / "chat_template.jinja").write_text(merge["chat_template"])
    ctx.record["merge"] = {"layers": len(layer_sources), "layer_sources": [f"{m}:{i}" for m, i in layer_sources],
                           "shards": shards, "tokenizer_files": copied, "left_out": left_out}


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
