"""What a score is: each draw's status, pass rates with 95 % Wilson intervals, and whether a difference is noise.

A test's draw ends in one of STATUSES. Only ``pass`` and ``fail`` are verdicts on the model; ``truncated`` (the
token cap cut the reply, in its thinking or its answer), ``error`` (the server or the harness broke) and ``not
run`` (no sandbox for generated code) say the eval could not tell, and are counted apart: a rate is passes over
verdicts, ``pass / (pass + fail)``, never over draws the eval could not grade.

The interval of a rate is Wilson's score interval over its draws (every test's every sample), which holds at 0/n
and n/n where the normal approximation does not. The difference of two rates gets Newcombe's interval built from
the two Wilson intervals; a difference whose interval holds 0 is "within noise": the two scores are not told apart
by this many draws.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

STATUSES = ("pass", "fail", "truncated", "error", "not run")
Z95 = 1.959963984540054


def wilson(passes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for ``passes`` of ``n`` Bernoulli draws; (0, 1) when there are none."""
    if n <= 0:
        return 0.0, 1.0
    p = passes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def tally(statuses: Iterable[str]) -> dict[str, Any]:
    """Counts per status of some draws, and their pass rate over verdicts with its interval (rounded to 4 places;
    rate None when no draw got a verdict)."""
    counts = Counter(statuses)
    if unknown := set(counts) - set(STATUSES):
        raise ValueError(f"unknown statuses {sorted(unknown)}; known: {', '.join(STATUSES)}")
    verdicts = counts["pass"] + counts["fail"]
    low, high = wilson(counts["pass"], verdicts)
    return {"statuses": {s: counts[s] for s in STATUSES if counts[s]}, "verdicts": verdicts,
            "rate": round(counts["pass"] / verdicts, 4) if verdicts else None,
            "interval": [round(low, 4), round(high, 4)]}


def verdict_of(statuses: Iterable[str]) -> str:
    """One test's status from its draws (samples): the commonest; a tie goes against pass (fail, truncated, error,
    not run, pass, in that order). Its rate and interval say how often it passed."""
    counts = Counter(statuses)
    order = ("fail", "truncated", "error", "not run", "pass")
    return max(order, key=lambda s: (counts[s], -order.index(s)))


def difference(a: Mapping[str, Any], b: Mapping[str, Any], z: float = Z95) -> dict[str, Any] | None:
    """``b``'s rate minus ``a``'s (two ``tally`` results) with Newcombe's hybrid score interval, and whether it is
    within noise (the interval holds 0); None when either has no verdict."""
    if a.get("rate") is None or b.get("rate") is None:
        return None
    pa, pb = a["statuses"].get("pass", 0) / a["verdicts"], b["statuses"].get("pass", 0) / b["verdicts"]
    la, ua = wilson(a["statuses"].get("pass", 0), a["verdicts"], z)
    lb, ub = wilson(b["statuses"].get("pass", 0), b["verdicts"], z)
    d = pb - pa
    low = d - math.sqrt((pb - lb) ** 2 + (ua - pa) ** 2)
    high = d + math.sqrt((ub - pb) ** 2 + (pa - la) ** 2)
    return {"delta": round(d, 4), "interval": [round(low, 4), round(high, 4)], "within_noise": low <= 0 <= high}
