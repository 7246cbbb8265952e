"""Merge methods, registered by name with mergekit's parameter names, defaults and semantics (mergekit 0.1.5).

A method is one function over the same tensor of every input model, registered with ``@merge_method``; a new
method is one small module. ``passthrough`` and ``interleave`` rearrange whole layers and are planned by
steps.merge itself. Parameter values follow mergekit: a scalar, a gradient list interpolated across the layers of
a slice, or a list of ``{filter: <substring of the tensor name>, value: ...}`` entries (first match wins); the
precedence is slice source > slice > merge block.

A method function is called as ``fn(xs, base, per_model, shared, gen)``: the inputs (already in the merge
dtype, freshly read, so the method may overwrite them), the base's index or None, the per-input and shared
parameter values for this tensor, and one seeded torch.Generator per input for the random methods.

Modules import torch inside their functions, so listing the methods (recipe validation, ``doit list``) stays cheap.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REQUIRED = object()          # a parameter with no default
MODULES = ("linear", "slerp", "task_arithmetic", "model_stock", "sce", "karcher")
LAYERED = ("passthrough", "interleave")


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Any]
    per_model: dict[str, Any] = field(default_factory=dict)   # resolved per input (e.g. weight, density)
    shared: dict[str, Any] = field(default_factory=dict)      # resolved per output tensor (e.g. t, normalize)
    base: str = "required"                                     # "required" | "optional" | "ignored"
    random: bool = False
    n_inputs: int | None = None                                # exactly this many inputs (slerp: 2)
    non_base_only: tuple[str, ...] = ()                        # per-model params never read for the base

    def defaults(self) -> dict[str, Any]:
        return {**self.per_model, **self.shared}


_REGISTRY: dict[str, Method] = {}


def merge_method(name: str, **spec: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        _REGISTRY[name] = Method(name, fn, **spec)
        return fn
    return register


def registry() -> dict[str, Method]:
    if not _REGISTRY:
        for module in MODULES:
            importlib.import_module(f"steps.methods.{module}")
    return _REGISTRY


def names() -> tuple[str, ...]:
    return (*LAYERED, *sorted(registry()))


def get(name: str) -> Method:
    methods = registry()
    if name not in methods:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(names())}")
    return methods[name]


# ------------------------------------------------------------------------------------------ parameter values

def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """One setting's value for a tensor at layer position t in [0, 1]; None when no filter entry matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        for entry in setting:
            flt = entry.get("filter")
            if flt is None or flt == "*" or flt in tensor_name:
                return evaluate(entry["value"], tensor_name, t)
        return None
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            s = t * (len(setting) - 1)
            i0 = int(s)
            i1 = min(len(setting) - 1, i0 + 1)
            f = s - i0
            return (1 - f) * setting[i0] + f * setting[i1]
        return setting[int(t * (len(setting) - 1))]
    return setting


def resolve(name: str, levels: list[dict[str, Any] | None], tensor_name: str, t: float, default: Any) -> Any:
    """The first defined value of a parameter across precedence levels (most specific first)."""
    for params in levels:
        if params and name in params:
            value = evaluate(params[name], tensor_name, t)
            if value is not None:
                return value
    if default is REQUIRED:
        raise KeyError(name)
    return default


def layer_position(index: int, n_layers: int) -> float:
    """mergekit's gradient position of layer `index` of an n-layer slice."""
    return index / (n_layers - 1) if n_layers > 1 else 1.0
