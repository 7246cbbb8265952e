"""Merge methods, registered by name with mergekit's parameter names, defaults and semantics (mergekit 0.1.5).

A method is one function over the same tensor of every input model, registered with ``@merge_method``; a new
method is one small module. ``passthrough`` and ``interleave`` rearrange whole layers and are planned by
steps.merge itself. Parameter values follow mergekit: a scalar, a gradient list interpolated across the layers of
a slice, or a list of ``{filter: <substring of the tensor name>, value: ...}`` entries (first match wins); the
precedence is slice source > slice > merge block.

Each parameter is declared as a ``Param``: its default, its type (number, int or bool), its range and what it
means. ``check_setting`` checks a recipe's setting against it (every gradient element and filter entry) when the
recipe is loaded, before any work, so a density of 1.5 or a weight of "heavy" never reaches the arithmetic.

A method function is called as ``fn(xs, base, per_model, shared, gen)``: the inputs (already in the merge
dtype, freshly read, so the method may overwrite them), the base's index or None, the per-input and shared
parameter values for this tensor, and one seeded torch.Generator per input for the random methods.

Modules import torch inside their functions, so listing the methods (recipe validation, ``doit list``) stays cheap.
"""
from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REQUIRED = object()          # a parameter with no default
MODULES = ("linear", "slerp", "task_arithmetic", "model_stock", "sce", "karcher")
LAYERED = ("passthrough", "interleave")


@dataclass(frozen=True)
class Param:
    """A parameter's default, type and range: kind "number" (any finite int or float), "int" (a whole number) or
    "bool"; lo/hi bound the value (None: unbounded), excluded when lo_open/hi_open; `what` says what it means."""
    default: Any
    kind: str = "number"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    what: str = ""

    def range_text(self) -> str:
        """The allowed values in interval notation, e.g. [0, 1] or (0, inf)."""
        lo = "-inf" if self.lo is None else _num(self.lo)
        hi = "inf" if self.hi is None else _num(self.hi)
        left = "(" if self.lo is None or self.lo_open else "["
        right = ")" if self.hi is None or self.hi_open else "]"
        return f"{left}{lo}, {hi}{right}"

    def fix(self) -> str:
        """What to write instead, in words."""
        if self.kind == "bool":
            return "use true or false"
        noun = "a whole number" if self.kind == "int" else "a number"
        if self.lo is None and self.hi is None:
            return f"use {noun}, e.g. 0.5" if self.kind == "number" else f"use {noun}"
        if self.lo is not None and self.hi is not None:
            if not self.lo_open and not self.hi_open:
                return f"use {noun} from {_num(self.lo)} to {_num(self.hi)}"
            return f"use {noun} in {self.range_text()}"
        if self.lo is not None:
            return f"use {noun} {'above' if self.lo_open else 'of at least'} {_num(self.lo)}"
        assert self.hi is not None
        return f"use {noun} {'below' if self.hi_open else 'of at most'} {_num(self.hi)}"

    def problem(self, value: Any) -> str | None:
        """Why one scalar value is not allowed (e.g. "is outside [0, 1]"), or None when it is."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else "is not true or false"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"is not {'a whole number' if self.kind == 'int' else 'a number'}"
        if not math.isfinite(value):
            return "is not a finite number"
        if self.kind == "int" and not isinstance(value, int):
            return "is not a whole number"
        if ((self.lo is not None and (value < self.lo or self.lo_open and value == self.lo))
                or (self.hi is not None and (value > self.hi or self.hi_open and value == self.hi))):
            return f"is outside {self.range_text()}"
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def show(value: Any) -> str:
    """A recipe value as YAML spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}[repr(value)]
    if isinstance(value, (int, str)):
        return repr(value)
    return type(value).__name__


# Parameters several methods share (mergekit 0.1.5's names and meanings).
WEIGHT = Param(REQUIRED, "number", what="the model's weight (any finite number; negative subtracts)")
DENSITY = Param(1.0, "number", 0, 1, what="the fraction of each task vector kept")
INT8_MASK = Param(False, "bool", what="keep the sign-consensus mask in int8 to save memory")
LAMBDA = Param(1.0, "number", what="the factor the merged task vector is scaled by")

# passthrough and interleave (planned by steps.merge, not registered here)
LAYERED_PARAMS = {"scale": Param(None, "number", what="the factor a source's layer tensors are multiplied by")}


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Any]
    per_model: dict[str, Any] = field(default_factory=dict)   # resolved per input (e.g. weight, density): defaults
    shared: dict[str, Any] = field(default_factory=dict)      # resolved per output tensor (e.g. t, normalize)
    base: str = "required"                                     # "required" | "optional" | "ignored"
    random: bool = False
    n_inputs: int | None = None                                # exactly this many inputs (slerp: 2)
    non_base_only: tuple[str, ...] = ()                        # per-model params never read for the base
    params: dict[str, Param] = field(default_factory=dict)    # every parameter's type and range
    # a check across one model's plain parameter values (e.g. della's density ± epsilon; a value set by filter
    # entries is left out): (the parameter to change, the message), or None
    check: Callable[[dict[str, Any]], tuple[str, str] | None] | None = None

    def defaults(self) -> dict[str, Any]:
        return {**self.per_model, **self.shared}


_REGISTRY: dict[str, Method] = {}


def merge_method(name: str, per_model: dict[str, Param] | None = None, shared: dict[str, Param] | None = None,
                 **spec: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a method; every parameter, per model or shared, is a Param (its default, type and range)."""
    per_model, shared = dict(per_model or {}), dict(shared or {})
    for p, declared in {**per_model, **shared}.items():
        if not isinstance(declared, Param):
            raise TypeError(f"merge method {name!r}: parameter {p!r} is not declared as a Param (type and range)")

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        _REGISTRY[name] = Method(name, fn, per_model={p: d.default for p, d in per_model.items()},
                                 shared={p: d.default for p, d in shared.items()},
                                 params={**per_model, **shared}, **spec)
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


def params(name: str) -> dict[str, Param]:
    """The parameters a method (or passthrough/interleave) takes, with their types and ranges."""
    return dict(LAYERED_PARAMS) if name in LAYERED else dict(get(name).params)


def check_setting(name: str, spec: Param, setting: Any) -> tuple[str, str] | None:
    """Check one recipe setting of parameter `name`: a scalar, a gradient list (each element), a list of
    {filter, value} entries or one such mapping (each value in turn). None when it is allowed; otherwise the key
    suffix down to the bad element (e.g. "[1]" or "[0].value") and the message (value, range, meaning, fix)."""
    what = f": {spec.what}" if spec.what else ""
    if isinstance(setting, dict):
        return _check_entry(name, spec, setting, "")
    if isinstance(setting, list):
        if not setting:
            return "", (f"{name} is an empty list{what}; give one value, a gradient list of values or a list of "
                        f"{{filter: <substring>, value: ...}} entries ({spec.fix()})")
        if any(isinstance(e, dict) for e in setting):
            for i, entry in enumerate(setting):
                if not isinstance(entry, dict):
                    return f"[{i}]", (f"{name} mixes filter entries with {show(entry)}; give every element as "
                                      "{filter: <substring>, value: ...} (a last {value: ...} catches the rest)")
                found = _check_entry(name, spec, entry, f"[{i}]")
                if found is not None:
                    return found
            return None
        for i, element in enumerate(setting):
            if isinstance(element, (list, dict)):
                return f"[{i}]", (f"{name} gradient element {i} is a {type(element).__name__}; a gradient lists "
                                  f"plain values{what}; {spec.fix()}")
            problem = spec.problem(element)
            if problem is not None:
                return f"[{i}]", f"{name} {show(element)} (gradient element {i}) {problem}{what}; {spec.fix()}"
        return None
    problem = spec.problem(setting)
    return None if problem is None else ("", f"{name} {show(setting)} {problem}{what}; {spec.fix()}")


FILTER_KEYS = ("filter", "value")


def _did_you_mean(word: str) -> str:
    close = difflib.get_close_matches(word, FILTER_KEYS, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_entry(name: str, spec: Param, entry: dict[Any, Any], key: str) -> tuple[str, str] | None:
    for k in entry:
        if k not in FILTER_KEYS:
            return f"{key}.{k}", (f"unknown key{_did_you_mean(str(k))} in a filter entry of {name}; an entry is "
                                  "{filter: <substring of the tensor name>, value: ...}")
    if "value" not in entry:
        return f"{key}.value", f"missing; a filter entry of {name} gives the value for the tensors it matches"
    flt = entry.get("filter")
    if flt is not None and not isinstance(flt, str):
        return f"{key}.filter", (f"{name} filter {show(flt)} is not a string; give a substring of the tensor "
                                 "names (e.g. self_attn or mlp), or leave filter out to match every tensor")
    found = check_setting(name, spec, entry["value"])
    if found is None:
        return None
    return f"{key}.value{found[0]}", found[1]


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
