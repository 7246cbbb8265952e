"""linear: the weighted average of the inputs (mergekit ``linear``), in float32 (float64 for float64 inputs)."""
from __future__ import annotations

from typing import Any

from steps.methods import WEIGHT, Param, merge_method


def work_dtype(dtype: Any) -> Any:
    import torch
    return torch.float64 if dtype == torch.float64 else torch.float32


@merge_method("linear", per_model={"weight": WEIGHT},
              shared={"normalize": Param(True, "bool", what="divide the sum by the sum of the weights")},
              base="ignored")
def linear(xs: list[Any], base: int | None, per_model: list[dict[str, Any]], shared: dict[str, Any],
           gen: Any) -> Any:
    import torch
    work = work_dtype(xs[0].dtype)
    weights = torch.tensor([float(p["weight"]) for p in per_model], dtype=work)
    acc = torch.zeros(xs[0].shape, dtype=work)
    for x, w in zip(xs, weights, strict=True):
        acc.addcmul_(x.to(work), w)
    if shared["normalize"]:
        acc = acc / weights.sum()
    return acc.to(xs[0].dtype)
