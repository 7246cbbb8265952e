"""The arithmetic merges, tensor by tensor: the plan of every output tensor and how it is computed (steps.methods)
or copied as bytes."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from steps import settings
from steps.errors import RecipeError
from steps.hashing import digest_value
from steps.merge.layout import (Model, Slice, SliceSource, _compute_dtype, _copy_tensor, _is_pre, _settings, _to_bytes,
                                 _torch_dtype)
from steps.methods import Method, layer_position, resolve
from steps.tensors import (MERGEABLE, TORCH_DTYPES, OutTensor)

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


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
    return settings.merge_device()


def _seed(seed: int, tensor: str, model: str) -> int:
    return int(digest_value([seed, tensor, model])[:15], 16)

