"""The recipe's ``matrix:``: a sweep. Dotted paths into the recipe (list items by index:
``merge.slices.1.sources.0.layer_range``) each map to a list of values (a value may be a whole block); the cells
are the product of the lists, less ``exclude:`` entries (a cell matching every path-value pair of one is dropped),
plus ``include:`` entries (each one more cell; paths it does not give keep the recipe's own value). ``rank:`` says
what orders the cells in the scoreboard. Each cell is named by its settings (``max_steps-8``,
``layer_range-8-30+t-0.5``) and is checked as a recipe of its own; an error in one names the matrix path.

This module only expands the YAML: steps.recipe loads each cell, steps.plan shares the stages cells agree on.
"""
from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from typing import Any

from steps.recipe.fields import Checker, Field, did_you_mean

RESERVED = ("exclude", "include", "rank")
SWEEPABLE = ("merge", "gguf", "imatrix", "quantize", "heal", "bench", "eval")   # what a cell may change
RANK_BY = ("score", "ppl", "kld", "size")       # score: higher is better; the others: lower is better
RANK = {
    "by":      Field("list", ["score", "ppl"]),
    "gguf":    Field("str"),                     # default: the first of eval.ggufs, else the first quant
    "variant": Field("choice", "final", choices=("final", "merged", "healed")),   # final: healed where it heals
}
MAX_CELLS = 64
LABEL_CHARS = re.compile(r"[^A-Za-z0-9_.]")


@dataclass(frozen=True)
class Cell:
    name: str                              # its settings in words: "max_steps-8", "layer_range-8-30+t-0.5"
    settings: dict[str, Any]               # dotted path -> value
    parts: dict[str, str]                  # dotted path -> its words in the name ("max_steps-8")

    def tag(self, paths: set[str]) -> str:
        """The words of the settings on these paths: what names a stage that only they change."""
        return "+".join(words for path, words in self.parts.items() if path in paths)


def expand(check: Checker, raw: dict[str, Any]) -> list[tuple[Cell, dict[str, Any]]]:
    """The cells of a recipe with a ``matrix:`` and, for each, the recipe's YAML with its settings applied (no
    ``matrix:`` left)."""
    spec = raw["matrix"]
    if not isinstance(spec, dict) or not [k for k in spec if k not in RESERVED]:
        raise check.fail("matrix", "expected a mapping of dotted recipe paths to lists of values, e.g. "
                         "{heal.train.max_steps: [4, 8, 16]}")
    base = {k: v for k, v in raw.items() if k != "matrix"}
    axes: dict[str, list[Any]] = {}
    for path, values in spec.items():
        if path in RESERVED:
            continue
        where = f"matrix.{path}"
        _locate(check, base, str(path), where)
        if not isinstance(values, list) or not values:
            raise check.fail(where, f"expected a non-empty list of values for {path}, got {values!r}")
        axes[str(path)] = values
    combos = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    for i, rule in enumerate(_entries(check, spec.get("exclude"), "matrix.exclude")):
        for path in rule:
            if path not in axes:
                raise check.fail(f"matrix.exclude[{i}].{path}", f"not a path of the matrix; one of {', '.join(axes)}")
        combos = [c for c in combos if not all(c[p] == v for p, v in rule.items())]
    for i, extra in enumerate(_entries(check, spec.get("include"), "matrix.include")):
        for path in extra:
            _locate(check, base, path, f"matrix.include[{i}].{path}")
        combos.append(dict(extra))
    if not combos:
        raise check.fail("matrix.exclude", "excludes every cell; keep at least one")
    if len(combos) > MAX_CELLS:
        raise check.fail("matrix", f"{len(combos)} cells is more than {MAX_CELLS}; sweep fewer values at a time")
    names = _names(combos)
    cells, seen = [], {}
    for parts, settings in zip(names, combos, strict=True):
        name = "+".join(parts.values()) or "recipe"
        if name in seen:
            raise check.fail("matrix.include", f"cell {name} is listed twice; give each cell other settings")
        seen[name] = True
        text = copy.deepcopy(base)
        for path, value in settings.items():
            parent, last = _locate(check, text, path, f"matrix.{path}")
            parent[last] = copy.deepcopy(value)
        cells.append((Cell(name, settings, parts), text))
    return cells


def _entries(check: Checker, value: Any, key: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(e, dict) and e for e in value):
        raise check.fail(key, "expected a list of mappings of matrix paths to values")
    return [{str(k): v for k, v in e.items()} for e in value]


def _locate(check: Checker, raw: dict[str, Any], path: str, where: str) -> tuple[Any, Any]:
    """The container and key/index a dotted path names in the recipe's YAML. Every step but the last must exist;
    the last may be a key the recipe leaves at its default (the block's schema then checks it)."""
    parts = path.split(".")
    if parts[0] not in SWEEPABLE:
        raise check.fail(where, f"a matrix sweeps {', '.join(SWEEPABLE)}; {parts[0]!r} is not one of them"
                         + did_you_mean(parts[0], SWEEPABLE))
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        so_far = ".".join(parts[:depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise check.fail(where, f"{so_far} does not exist in the recipe (a list of {len(node)}: index it "
                                 f"0 to {len(node) - 1})")
            key: Any = int(part)
            if last:
                return node, key
            node = node[key]
        elif isinstance(node, dict):
            if part not in node and not (last and depth > 0):
                raise check.fail(where, f"{so_far} does not exist in the recipe"
                                 + did_you_mean(part, [str(k) for k in node]))
            if last:
                return node, part
            node = node[part]
        else:
            raise check.fail(where, f"{'.'.join(parts[:depth])} is a value, not a block; {path} does not exist "
                             "in the recipe")
    raise AssertionError(path)


def _names(combos: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Each cell's name from its settings: the path's last key, then its value (``max_steps-8``), joined with
    '+'. Two paths with one last key are named by their whole path; a value that is a block, or whose words two
    values share, by its place in its list (``slices-v2``)."""
    paths = list(dict.fromkeys(p for c in combos for p in c))
    leaf = {p: next((x for x in reversed(p.split(".")) if not x.isdigit()), p) for p in paths}
    label = {p: leaf[p] if list(leaf.values()).count(leaf[p]) == 1 else p.replace(".", "_") for p in paths}
    words: dict[str, dict[str, str]] = {}
    for p in paths:
        values = []
        for c in combos:
            if p in c and c[p] not in values:
                values.append(c[p])
        texts = [_words(v) or f"v{i + 1}" for i, v in enumerate(values)]
        if len(set(texts)) < len(texts):
            texts = [f"v{i + 1}" for i in range(len(values))]
        words[p] = {repr(v): str(t) for v, t in zip(values, texts, strict=True)}
    return [{p: f"{label[p]}-{words[p][repr(v)]}" for p, v in c.items()} for c in combos]


def _words(value: Any) -> str | None:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        text = LABEL_CHARS.sub("_", str(value))
        return text[:32] if text else None
    if value is None:
        return "none"
    if isinstance(value, list) and value and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                 for x in value) and len(value) <= 4:
        return "-".join(str(x) for x in value)
    return None


def rank_block(check: Checker, value: Any, *, heals: bool, ggufs: list[str]) -> dict[str, Any]:
    """matrix.rank, normalized: ``by`` (figures in order, ties broken by the next), ``gguf`` and ``variant``: the
    one GGUF of each cell the ranking compares."""
    spec = check.block(value, "matrix.rank", RANK)
    for i, by in enumerate(spec["by"]):
        if by not in RANK_BY:
            raise check.fail(f"matrix.rank.by[{i}]", f"unknown figure {by!r}{did_you_mean(str(by), RANK_BY)}; one "
                             f"of {', '.join(RANK_BY)}")
    if not spec["by"]:
        raise check.fail("matrix.rank.by", f"expected a non-empty list from {', '.join(RANK_BY)}")
    if not ggufs:
        raise check.fail("matrix.rank.gguf", "the cells make no GGUF in common to rank them by; sweep fewer GGUF "
                         "settings, or keep one quant in every cell")
    spec["gguf"] = spec["gguf"] or ggufs[0]
    if spec["gguf"] not in ggufs:
        raise check.fail("matrix.rank.gguf", f"{spec['gguf']!r} is not a GGUF every cell makes; one of "
                         f"{', '.join(ggufs)}")
    if spec["variant"] == "healed" and not heals:
        raise check.fail("matrix.rank.variant", "healed needs a heal: block in every cell; use final (each cell's "
                         "healed model where it heals, else its merge) or merged")
    return spec
