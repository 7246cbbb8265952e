"""The recipe's merge: block, in mergekit's syntax (a pasted mergekit YAML loads unchanged): the method, its
parameters checked against steps.methods' declarations (type, range, gradients, filters), slices or models, and
every required parameter present before any weight is read."""
from __future__ import annotations

from typing import Any

from steps.recipe.fields import Checker, Field, did_you_mean
from steps.recipe.sources import Source, _model_ref
from steps.tensors import source_layer_count

DTYPES = ("float32", "float16", "bfloat16")
MERGE = {                                           # mergekit's keys; the method's parameters: steps.methods
    "merge_method":     Field("any"),
    "slices":           Field("any"),
    "models":           Field("any"),
    "base_model":       Field("any"),
    "parameters":       Field("any"),
    "dtype":            Field("choice", choices=DTYPES, noun="dtype"),
    "out_dtype":        Field("choice", choices=DTYPES, noun="dtype"),
    "tokenizer_source": Field("any"),
    "tokenizer":        Field("any"),
    "chat_template":    Field("any"),
    "shard_bytes":      Field("int", lo=1),
    "random_seed":      Field("int", lo=0, what="a non-negative integer (the seed of dare_*/della* drops), such as 0"),
}
MERGE_KEYS = tuple(MERGE)
SLICE_KEYS = ("sources", "parameters")
SLICE_SOURCE_KEYS = ("model", "layer_range", "parameters")


def _merge(check: Checker, value: Any, sources: dict[str, Source]) -> dict[str, Any]:
    from steps import methods
    merge = dict(check.mapping(value, "merge", MERGE_KEYS))
    name = merge.get("merge_method")
    known = methods.names()
    if name not in known:
        raise check.fail("merge.merge_method", f"unknown method {name!r}{did_you_mean(str(name), known)}; "
                         f"known: {', '.join(known)}")
    check.block(merge, "merge", MERGE, fill=False)          # dtype, out_dtype, shard_bytes, random_seed
    if ("slices" in merge) == ("models" in merge):
        raise check.fail("merge", "give either slices: (layer ranges) or models: (whole models), as in mergekit")
    layered = name in methods.LAYERED
    method = None if layered else methods.get(name)
    allowed = _allowed_params(name, method)
    _parameters(check, merge.get("parameters"), "merge.parameters", allowed)
    for key in ("tokenizer_source", "tokenizer", "base_model"):
        if key in merge and merge[key] != "base":
            _model_ref(check, merge[key], f"merge.{key}", sources)
    if method is not None and method.base == "required" and "base_model" not in merge:
        raise check.fail("merge.base_model", f"{name} needs a base_model (the model the task vectors start from)")
    if "slices" in merge:
        slices = merge["slices"]
        if not isinstance(slices, list) or not slices:
            raise check.fail("merge.slices", "expected a list of slices, each with sources: "
                             "[{model: <source>, layer_range: [start, end]}]")
        for i, sl in enumerate(slices):
            sl = check.mapping(sl, f"merge.slices[{i}]", SLICE_KEYS)
            _parameters(check, sl.get("parameters"), f"merge.slices[{i}].parameters", allowed)
            srcs = sl.get("sources")
            if not isinstance(srcs, list) or not srcs or (layered and len(srcs) != 1):
                raise check.fail(f"merge.slices[{i}].sources", f"{name} takes exactly one source per slice"
                                 if layered else "expected a list of {model, layer_range} sources")
            for j, src in enumerate(srcs):
                _source_entry(check, src, f"merge.slices[{i}].sources[{j}]", sources, allowed, needs_range=True)
    else:
        models = merge["models"]
        if not isinstance(models, list) or not models:
            raise check.fail("merge.models", "expected a list of {model: <source>, parameters: {...}}")
        for i, entry in enumerate(models):
            _source_entry(check, entry, f"merge.models[{i}]", sources, allowed, needs_range=False)
    if method is not None:
        _required_params(check, merge, method)
    template = merge.get("chat_template")
    if template is not None and template != "auto" and not (isinstance(template, str) and "{" in template):
        raise check.fail("merge.chat_template", f"expected a Jinja chat template or 'auto' (the tokenizer "
                         f"source's own), got {template!r}; named templates are not built in")
    return merge


def _allowed_params(name: str, method: Any) -> dict[str, Any]:
    """The parameters the method takes, each with its type and range (steps.methods.Param)."""
    from steps import methods
    return methods.params(name)


def _parameters(check: Checker, value: Any, key: str, allowed: dict[str, Any]) -> None:
    """A parameters: mapping: known names only, each setting (scalar, gradient list, filter entries) of the
    parameter's type and within its range, the key naming the bad element."""
    from steps import methods
    if value is None:
        return
    check.mapping(value, key, tuple(allowed))
    for p, setting in value.items():
        found = methods.check_setting(p, allowed[p], setting)
        if found is not None:
            raise check.fail(f"{key}.{p}{found[0]}", found[1])


def _source_entry(check: Checker, src: Any, key: str, sources: dict[str, Source], allowed: dict[str, Any],
                  needs_range: bool) -> None:
    check.mapping(src, key, SLICE_SOURCE_KEYS)
    _model_ref(check, src.get("model"), f"{key}.model", sources)
    _parameters(check, src.get("parameters"), f"{key}.parameters", allowed)
    rng = src.get("layer_range")
    if rng is None and not needs_range:
        return
    if (not isinstance(rng, list) or len(rng) != 2 or not all(type(x) is int for x in rng)
            or not 0 <= rng[0] < rng[1]):
        raise check.fail(f"{key}.layer_range", f"expected [start, end) with 0 <= start < end, got {rng!r}")
    source = sources[src["model"]]
    if source.path is not None:
        layers = source_layer_count(source.path)
        if layers is not None and rng[1] > layers:
            raise check.fail(f"{key}.layer_range", f"{rng} is outside model '{src['model']}', which has "
                             f"{layers} layers; use a range within [0, {layers}]")


def _required_params(check: Checker, merge: dict[str, Any], method: Any) -> None:
    """Every required parameter is set somewhere a model will find it (before any GB is read)."""
    from steps.methods import REQUIRED
    top = merge.get("parameters") or {}
    slices = merge["slices"] if "slices" in merge else [{"sources": merge["models"]}]
    for p, default in method.shared.items():
        if default is REQUIRED and p not in top and not all(p in (sl.get("parameters") or {}) for sl in slices):
            raise check.fail(f"merge.parameters.{p}", f"missing; {method.name} needs {p}")
    for i, sl in enumerate(slices):
        for j, src in enumerate(sl["sources"]):
            is_base = src["model"] == merge.get("base_model") and method.base != "ignored"
            for p, default in method.per_model.items():
                if default is not REQUIRED or (is_base and p in method.non_base_only):
                    continue
                if p not in top and p not in (sl.get("parameters") or {}) and p not in (src.get("parameters") or {}):
                    where = f"merge.slices[{i}].sources[{j}]" if "slices" in merge else f"merge.models[{j}]"
                    raise check.fail(f"{where}.parameters.{p}", f"missing; {method.name} needs {p} for model "
                                     f"'{src['model']}' (set it here, on the slice or in merge.parameters)")
            if method.check is not None and not is_base:
                where = f"merge.slices[{i}].sources[{j}]" if "slices" in merge else f"merge.models[{j}]"
                levels = [(f"{where}.parameters", src.get("parameters") or {}),
                          (f"merge.slices[{i}].parameters", sl.get("parameters") or {}),
                          ("merge.parameters", top)]
                _cross_check(check, method, levels, where)


def _cross_check(check: Checker, method: Any, levels: list[tuple[str, dict[str, Any]]], where: str) -> None:
    """The method's check across one model's parameter values (della: density ± epsilon within (0, 1)), at every
    knot of their gradients; settings with filter entries depend on tensor names and are left to the merge."""
    from steps.methods import REQUIRED, evaluate
    settings: dict[str, tuple[str, Any]] = {}
    for p, default in method.per_model.items():
        key, setting = next(((f"{k}.{p}", params[p]) for k, params in levels if p in params),
                            (f"{where}.parameters.{p}", default))
        if setting is REQUIRED or isinstance(setting, dict) or (isinstance(setting, list)
                                                                 and any(isinstance(e, dict) for e in setting)):
            continue
        settings[p] = (key, setting)
    knots = {0.0, 1.0}
    for _, setting in settings.values():
        if isinstance(setting, list) and len(setting) > 1:
            knots.update(k / (len(setting) - 1) for k in range(len(setting)))
    for t in sorted(knots):
        problem = method.check({p: evaluate(setting, "", t) for p, (_, setting) in settings.items()})
        if problem is not None:
            param, message = problem
            raise check.fail(settings[param][0], message)

