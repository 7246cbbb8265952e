"""Task-vector methods: task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della,
della_linear (mergekit's generalized task arithmetic).

Each non-base model's task vector (model - base) is sparsified (magnitude top-k for ties, random drop for DARE,
magnitude outliers for breadcrumbs, magnitude-ranked random drop for DELLA), weighted, optionally reduced to the
entries agreeing with the majority sign (TIES consensus), summed, normalized by the weights and scaled by lambda.
Everything is computed in the merge dtype, as in mergekit; the random drops draw from a generator seeded per tensor
and model, so a seed gives the same bytes whatever the order tensors are merged in.
"""
from __future__ import annotations

from typing import Any

from steps.methods import DENSITY, INT8_MASK, LAMBDA, WEIGHT, Param, merge_method

CHUNK = 1 << 22             # elements per step of the elementwise part

GAMMA = {"gamma": Param(0.01, "number", 0, 1, what="the fraction of largest-magnitude entries dropped as outliers")}
EPSILON = {"epsilon": Param(0.15, "number", 0, 0.5, hi_open=True,
                            what="the spread of keep probabilities around density (density - epsilon and "
                                 "density + epsilon must stay within (0, 1))")}

FAMILY = {
    #  name               consensus  sparsifier   normalize rescale  extra per-model parameter
    "task_arithmetic":   (False,     None,        False,    False,   {}),
    "ties":              (True,      "magnitude", True,     False,   {}),
    "dare_ties":         (True,      "random",    False,    True,    {}),
    "dare_linear":       (False,     "random",    False,    True,    {}),
    "breadcrumbs":       (False,     "outliers",  False,    False,   GAMMA),
    "breadcrumbs_ties":  (True,      "outliers",  False,    False,   GAMMA),
    "della":             (True,      "della",     True,     True,    EPSILON),
    "della_linear":      (False,     "della",     False,    True,    EPSILON),
}


def _rescaled(x: Any, mask: Any, rescale: bool) -> Any:
    """x * mask (in place: x is the method's own task vector); with rescale, matched to x's L1 norm
    (mergekit's rescale rule, not 1/density)."""
    import torch
    if not rescale:
        if mask.dtype == torch.bool:               # the mask is the caller's own: invert it in place
            return x.masked_fill_(mask.logical_not_(), 0)
        return x.mul_(mask)
    masked = x * mask
    before, after = float(torch.sum(torch.abs(x))), float(torch.sum(torch.abs(masked)))
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


_INT_VIEW = {"bfloat16": ("int16", 0x7FFF, 15), "float16": ("int16", 0x7FFF, 15), "float32": ("int32", 0x7FFFFFFF, 31)}


def _magnitude_codes(x: Any) -> tuple[Any, int] | None:
    """x's bit patterns as integers and the mask that clears the sign: for floats, |x| orders as these codes."""
    import torch
    spec = _INT_VIEW.get(str(x.dtype).removeprefix("torch."))
    if spec is None:
        return None
    return x.reshape(-1).view(getattr(torch, spec[0])), spec[1]


def _histogram(codes: Any, sign_mask: int, shift: int, bins: int, select: int | None = None) -> Any:
    """Counts of ((|code| >> shift) & (bins - 1)), over the codes whose top part equals `select` when given."""
    import torch
    counts = torch.zeros(bins, dtype=torch.int64)
    for start in range(0, codes.numel(), CHUNK):
        part = codes[start:start + CHUNK] & sign_mask
        if select is not None:
            part = part[(part >> 16) == select]
        counts += torch.bincount(((part >> shift) & (bins - 1)).to(torch.int64), minlength=bins)
    return counts


def _bin_from_top(counts: Any, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and how many elements lie in higher bins."""
    import torch
    from_top = torch.cumsum(counts.flip(0), 0)
    position = int(torch.searchsorted(from_top, torch.tensor(k)))
    return counts.numel() - 1 - position, (int(from_top[position - 1]) if position else 0)


def kth_largest_code(codes: Any, sign_mask: int, k: int) -> int:
    """The bit pattern of the k-th largest magnitude, by radix selection: a few chunked histogram passes, no sort,
    no index array, no copy of the tensor."""
    if sign_mask == 0x7FFF:
        return _bin_from_top(_histogram(codes, sign_mask, 0, 1 << 15), k)[0]
    high, above = _bin_from_top(_histogram(codes, sign_mask, 16, 1 << 15), k)
    low, _ = _bin_from_top(_histogram(codes, sign_mask, 0, 1 << 16, select=high), k - above)
    return (high << 16) | low


def top_k_mask(x: Any, k: int) -> Any:
    """A boolean mask (flat) of the k entries of largest magnitude (ties at the threshold: the first in index
    order). A selection rather than mergekit's full argsort: O(n) time, no int64 index array, the same set whenever
    the k-th magnitude is not tied."""
    import torch
    n = x.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    found = _magnitude_codes(x)
    if found is None:                                   # float64: a plain selection
        values = torch.abs(x).reshape(-1)
        threshold = torch.kthvalue(values, n - k + 1).values
        mask = values > threshold
        tied = torch.nonzero(values == threshold).flatten()
    else:
        codes, sign_mask = found
        threshold_code = kth_largest_code(codes, sign_mask, k)
        mask = torch.empty(n, dtype=torch.bool)
        for start in range(0, n, CHUNK):
            mask[start:start + CHUNK] = (codes[start:start + CHUNK] & sign_mask) > threshold_code
        tied = None
    missing = k - int(torch.count_nonzero(mask))
    if missing > 0:
        if tied is None:
            assert found is not None
            codes, sign_mask = found
            picks: list[Any] = []
            need = missing
            for start in range(0, n, CHUNK):
                hit = torch.nonzero((codes[start:start + CHUNK] & sign_mask) == threshold_code).flatten() + start
                picks.append(hit[:need])
                need -= int(picks[-1].numel())
                if need == 0:
                    break
            tied = torch.cat(picks)
        mask[tied[:missing]] = True
    return mask


def magnitude(x: Any, density: float, rescale: bool) -> Any:
    """Keep the int(density * n) entries of largest magnitude (at least one)."""
    import torch
    if density >= 1:
        return x
    if density <= 0 or x.numel() == 0:
        return torch.zeros_like(x)
    k = max(1, int(density * x.numel()))
    # ranked on the tensor's own values: every float dtype converts to float32 exactly and in order, so the set is
    # the one mergekit's float32 argsort ranks first
    mask = top_k_mask(x, k)
    return _rescaled(x, mask.reshape(x.shape), rescale)


def outliers(x: Any, density: float, gamma: float, rescale: bool) -> Any:
    """Breadcrumbs: drop the largest gamma fraction and the smallest entries, keeping int(density * n)."""
    import torch
    if density >= 1:
        return x
    n = x.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(x)
    target, n_top = int(density * n), int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    order = torch.sort(torch.abs(x).flatten().float()).indices
    mask = torch.zeros(n, dtype=x.dtype)
    mask[order[n_bottom:n_bottom + target]] = 1
    return _rescaled(x, mask.reshape(x.shape), rescale)


def _random_dtype(dtype: Any) -> Any:
    import torch
    return dtype if dtype == torch.bfloat16 else torch.float32


def random_drop(x: Any, density: float, rescale: bool, gen: Any) -> Any:
    """DARE: keep each entry with probability density."""
    import torch
    if density >= 1:
        return x
    work = _random_dtype(x.dtype)
    mask = torch.bernoulli(torch.full(x.shape, density, dtype=work), generator=gen)
    return _rescaled(x.to(work), mask, rescale).to(x.dtype)


def della(x: Any, density: float, epsilon: float, rescale: bool, gen: Any) -> Any:
    """DELLA: per row, keep probability rising linearly with magnitude rank from density-eps to density+eps."""
    import torch
    if density >= 1:
        return x
    if density <= 0:
        return torch.zeros_like(x)
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"della needs 0 < density - epsilon and density + epsilon < 1 (density {density}, "
                         f"epsilon {epsilon})")
    work = _random_dtype(x.dtype)
    rows = x.reshape(1, -1) if x.dim() == 1 else x
    ranks = torch.argsort(torch.argsort(torch.abs(rows), dim=1), dim=1) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    norm = torch.clamp((ranks - lo).to(work) / (hi - lo).clamp(min=1).to(work), 0, 1)
    probs = (density - epsilon) + 2 * epsilon * norm
    mask = torch.bernoulli(probs.to(work), generator=gen)
    return _rescaled(rows.to(work), mask, rescale).to(x.dtype).reshape(x.shape)


def della_bounds(values: dict[str, Any]) -> tuple[str, str] | None:
    """DELLA's keep probabilities, density - epsilon to density + epsilon, must lie in (0, 1) (mergekit's rule).
    The parameter to change and why, or None."""
    if "density" not in values or "epsilon" not in values:
        return None
    density, epsilon = float(values["density"]), float(values["epsilon"])
    if 0 < density < 1 and not (0 < density - epsilon and density + epsilon < 1):
        return "epsilon", (f"density {density:g} with epsilon {epsilon:g} gives keep probabilities outside (0, 1): "
                           "della needs 0 < density - epsilon and density + epsilon < 1; use an epsilon below "
                           f"{min(density, 1 - density):g}")
    return None


def _make(name: str) -> None:
    consensus, sparsifier, normalize, rescale, extra = FAMILY[name]

    def merge(xs: list[Any], base: int | None, per_model: list[dict[str, Any]], shared: dict[str, Any],
              gen: Any) -> Any:
        import torch
        assert base is not None
        b = xs[base]
        others = [i for i in range(len(xs)) if i != base]
        if not others:
            return b
        weights = [torch.tensor(float(per_model[i]["weight"]), dtype=b.dtype) for i in others]
        deltas = []
        for i, w in zip(others, weights, strict=True):
            delta, p = xs[i].sub_(b), per_model[i]      # in place: the inputs are the method's own copies
            density = float(p["density"])
            if sparsifier == "magnitude":
                delta = magnitude(delta, density, shared["rescale"])
            elif sparsifier == "outliers":
                delta = outliers(delta, density, float(p["gamma"]), shared["rescale"])
            elif sparsifier == "random":
                delta = random_drop(delta, density, shared["rescale"], gen[i])
            elif sparsifier == "della":
                delta = della(delta, density, float(p["epsilon"]), shared["rescale"], gen[i])
            deltas.append(delta.mul_(w).reshape(-1))
        # Elementwise from here on: done in chunks, summed with a wider accumulator as torch's sum over a stacked
        # dimension does, and written into the base's buffer (memory: one tensor per model plus a chunk).
        out = b.reshape(-1)
        wide = torch.float64 if b.dtype == torch.float64 else torch.float32
        for start in range(0, out.numel(), CHUNK):
            part = [d[start:start + CHUNK] for d in deltas]
            mixed = torch.zeros(part[0].shape, dtype=wide)
            if consensus:
                for d in part:
                    mixed += d
                majority = mixed >= 0
                mixed.zero_()
                divisor = torch.zeros(part[0].shape, dtype=wide)
                for d, w in zip(part, weights, strict=True):
                    agree = torch.where(majority, d > 0, d < 0)
                    mixed += d * agree
                    divisor += w.to(wide) * agree
                mixed_d, divisor_d = mixed.to(b.dtype), divisor.to(b.dtype)
                divisor_d[divisor_d == 0] = 1
            else:
                for d in part:
                    mixed += d
                mixed_d = mixed.to(b.dtype)
                divisor_d = torch.stack(weights).sum()
                if float(torch.abs(divisor_d)) < 1e-8:
                    divisor_d = torch.ones_like(divisor_d)
            if shared["normalize"]:
                mixed_d = mixed_d / divisor_d
            if float(shared["lambda"]) != 1:
                mixed_d = mixed_d * float(shared["lambda"])
            out[start:start + CHUNK] += mixed_d
        return b

    merge.__name__ = name
    merge_method(name, per_model={"weight": WEIGHT, "density": DENSITY, **extra},
                 non_base_only=("weight", "density", *extra),
                 shared={"int8_mask": INT8_MASK,
                         "normalize": Param(normalize, "bool", what="divide the sum by the sum of the weights"),
                         "rescale": Param(rescale, "bool", what="rescale each kept task vector to its L1 norm"),
                         "lambda": LAMBDA},
                 base="required", random=sparsifier in ("random", "della"),
                 check=della_bounds if sparsifier == "della" else None)(merge)


for _name in FAMILY:
    _make(_name)
