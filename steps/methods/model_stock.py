"""model_stock: interpolate between the base and the average of the fine-tuned models by a ratio derived from
the angles between their task vectors (mergekit ``model_stock``)."""
from __future__ import annotations

from itertools import combinations
from typing import Any

from steps.methods import Param, merge_method


@merge_method("model_stock", shared={"filter_wise": Param(False, "bool", what="one ratio per row instead of per "
                                                                           "tensor")}, base="required")
def model_stock(xs: list[Any], base: int | None, per_model: list[dict[str, Any]], shared: dict[str, Any],
                gen: Any) -> Any:
    import torch
    assert base is not None
    b = xs[base]
    models = [x for i, x in enumerate(xs) if i != base]
    if len(models) < 2:
        raise ValueError("model_stock needs at least two models besides the base")
    shape = b.shape
    if shared["filter_wise"]:
        flat = [m.reshape(1, -1) if m.dim() == 1 else m for m in models]
        base_flat = b.reshape(1, -1) if b.dim() == 1 else b
    else:
        flat = [m.reshape(-1) for m in models]
        base_flat = b.reshape(-1)
    offsets = [m - base_flat for m in flat]
    cosines = []
    for u, v in combinations(offsets, 2):
        norms = torch.linalg.vector_norm(u, dim=-1) * torch.linalg.vector_norm(v, dim=-1)
        cosines.append(torch.clamp(torch.sum(u * v, dim=-1) / torch.clamp(norms, min=1e-6), -1, 1))
    cos = torch.stack(cosines).mean(dim=0)
    n = len(models)
    denominator = 1 + (n - 1) * cos
    ratio = torch.where(torch.abs(denominator) < 1e-6, torch.zeros_like(cos), n * cos / denominator)
    if shared["filter_wise"]:
        ratio = ratio.unsqueeze(-1)
    average = sum(flat) / n
    out = ratio * average + (1 - ratio) * base_flat
    return out.reshape(shape).to(b.dtype)
