"""slerp and nuslerp: spherical interpolation of two tensors (mergekit ``slerp`` and ``nuslerp``).

slerp works on each whole tensor as one vector, from the base (t = 0) to the other model (t = 1), in float32,
and falls back to linear interpolation when the two are nearly parallel (|cos| > 0.9995). nuslerp takes t from
the two models' weights (t = w2 / (w1 + w2)), optionally row-wise, and interpolates the task vectors when a base
is given.
"""
from __future__ import annotations

import math
from typing import Any

from steps.methods import REQUIRED, WEIGHT, Param, merge_method
from steps.methods.linear import work_dtype

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


@merge_method("slerp", shared={"t": Param(REQUIRED, "number", 0, 1, what="the position from the base model (0) to "
                                         "the other model (1)")}, base="required", n_inputs=2)
def slerp(xs: list[Any], base: int | None, per_model: list[dict[str, Any]], shared: dict[str, Any],
          gen: Any) -> Any:
    import torch
    assert base is not None
    v0, v1 = xs[base], xs[1 - base]
    work = work_dtype(v0.dtype)
    a, b = v0.to(work).flatten(), v1.to(work).flatten()
    t = float(torch.tensor(float(shared["t"]), dtype=torch.float32))
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = torch.where(na > NORM_EPS, na, torch.ones_like(na))
    nb = torch.where(nb > NORM_EPS, nb, torch.ones_like(nb))
    dot = float(torch.clamp(torch.sum((a / na) * (b / nb)), -1.0, 1.0)) if a.numel() else 1.0
    if abs(dot) > DOT_THRESHOLD:
        c0, c1 = 1.0 - t, t
    else:
        theta = math.acos(dot)
        c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return (c0 * a + c1 * b).reshape(v0.shape).to(v0.dtype)


def _nuslerp_vectors(t: float, a: Any, b: Any) -> Any:
    import torch
    an = a / torch.clamp(torch.linalg.vector_norm(a, dim=-1, keepdim=True), min=1e-7)
    bn = b / torch.clamp(torch.linalg.vector_norm(b, dim=-1, keepdim=True), min=1e-7)
    cos = torch.clamp(torch.sum(an * bn, dim=-1, keepdim=True), -1.0, 1.0)
    colinear = (1 - cos * cos) <= 1e-16
    theta = torch.where(colinear, torch.zeros_like(cos), torch.acos(cos))
    sin = torch.sin(theta)
    safe = torch.where(colinear, torch.ones_like(sin), sin)
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / safe
    return torch.where(colinear, (1 - t) * a + t * b, spherical)


@merge_method("nuslerp", per_model={"weight": WEIGHT}, non_base_only=("weight",), shared={
    "nuslerp_flatten": Param(True, "bool", what="interpolate each tensor as one flat vector"),
    "nuslerp_row_wise": Param(False, "bool", what="interpolate row vectors rather than column vectors"),
}, base="optional")
def nuslerp(xs: list[Any], base: int | None, per_model: list[dict[str, Any]], shared: dict[str, Any],
            gen: Any) -> Any:
    others = [i for i in range(len(xs)) if i != base]
    if len(others) != 2:
        raise ValueError(f"nuslerp merges exactly two models besides the base, got {len(others)}")
    w1, w2 = (float(per_model[i]["weight"]) for i in others)
    t = w2 / (w1 + w2) if abs(w1 + w2) >= 1e-6 else 0.5
    a, b = xs[others[0]], xs[others[1]]
    if base is not None:
        a, b = a - xs[base], b - xs[base]
    shape = a.shape
    if shared["nuslerp_flatten"]:
        a, b = a.reshape(-1), b.reshape(-1)
    elif shared["nuslerp_row_wise"]:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    out = _nuslerp_vectors(t, a, b)
    if not shared["nuslerp_flatten"] and shared["nuslerp_row_wise"]:
        out = out.transpose(0, -1)
    out = out.reshape(shape)
    return out + xs[base] if base is not None else out
