"""karcher: the Riemannian (Karcher) mean of the inputs' directions, scaled by their mean norm
(mergekit ``karcher``)."""
from __future__ import annotations

from typing import Any

from steps.methods import Param, merge_method
from steps.methods.linear import work_dtype


@merge_method("karcher", shared={
    "max_iter": Param(10, "int", 1, what="the most iterations of the mean's refinement"),
    "tol": Param(1e-5, "number", 0, lo_open=True, what="the convergence tolerance (also the smallest norm counted)"),
}, base="ignored")
def karcher(xs: list[Any], base: int | None, per_model: list[dict[str, Any]], shared: dict[str, Any],
            gen: Any) -> Any:
    import torch
    if len(xs) == 1:
        return xs[0]
    dtype, tol = xs[0].dtype, float(shared["tol"])
    alphas = [1.0 / len(xs)] * len(xs)
    norms = [float(torch.linalg.vector_norm(x.to(work_dtype(dtype)))) for x in xs]
    units = [x / n if n > 0 else torch.zeros_like(x) for x, n in zip(xs, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    total = sum(alphas[i] for i in valid)
    weights = {i: alphas[i] / total for i in valid}
    mean: Any = sum(weights[i] * units[i] for i in valid)
    norm = float(torch.linalg.vector_norm(mean))
    mean = units[valid[0]] if norm < tol else mean / norm
    for _ in range(int(shared["max_iter"])):
        tangent = torch.zeros_like(mean)
        for i in valid:
            d = float(torch.clamp(torch.sum(mean * units[i]), -1.0, 1.0))
            theta = float(torch.arccos(torch.tensor(d)))
            if theta >= tol:
                tangent = tangent + weights[i] * (theta / float(torch.sin(torch.tensor(theta)))) * (units[i] - d * mean)
        tau = float(torch.linalg.vector_norm(tangent))
        if tau < tol:
            break
        mean = float(torch.cos(torch.tensor(tau))) * mean + float(torch.sin(torch.tensor(tau))) * (tangent / tau)
        norm = float(torch.linalg.vector_norm(mean))
        if norm > tol:
            mean = mean / norm
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return (scale * mean).to(dtype)
