"""sce: select the task-vector entries of highest variance across models, weight each model by its task vector's
energy, and keep the entries that agree with the majority sign (mergekit ``sce``)."""
from __future__ import annotations

from typing import Any

from steps.methods import INT8_MASK, Param, merge_method


@merge_method("sce", shared={
    "select_topk": Param(1.0, "number", 0, 1, what="the fraction of task-vector entries of highest variance kept"),
    "int8_mask": INT8_MASK,
}, base="required")
def sce(xs: list[Any], base: int | None, per_model: list[dict[str, Any]], shared: dict[str, Any], gen: Any) -> Any:
    import torch
    assert base is not None
    b = xs[base]
    others = [x for i, x in enumerate(xs) if i != base]
    if not others:
        return b
    tv = torch.stack([x - b for x in others])
    topk = float(shared["select_topk"])
    if topk < 1:
        variance = torch.var(tv, dim=0, unbiased=False)
        k = int(torch.count_nonzero(variance) * topk) if topk > 0 else 0
        mask = torch.zeros(variance.numel(), dtype=tv.dtype)
        if k > 0:
            mask[torch.topk(torch.abs(variance).flatten(), k, largest=True).indices] = 1
        tv = tv * mask.reshape(variance.shape)
    majority = torch.where(tv.sum(dim=0) >= 0, 1, -1).to(tv.dtype)
    agree = torch.sign(tv) == majority
    energy = [float(torch.mean(t * t)) for t in tv]
    total = sum(energy)
    weights = [1 / len(energy)] * len(energy) if abs(total) < 1e-6 else [e / total for e in energy]
    erased = torch.stack([w * a.to(tv.dtype) for w, a in zip(weights, agree, strict=True)])
    merged = (tv * erased).sum(dim=0) / torch.clamp(erased.sum(dim=0), min=1e-6)
    return (b + merged).to(b.dtype)
