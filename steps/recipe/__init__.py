"""Recipe schema: load a YAML recipe, refuse what is wrong before any work, normalize what is right.

An error names the file, the key (dotted path) and the fix, with a did-you-mean for misspelt keys. Each block is
declared as data (steps.recipe.fields.Field tables: types, ranges, defaults) and checked in one place; the package
imports no stage module. reader: the YAML file itself; sources: the named sources; merge: the mergekit-syntax merge
block; blocks: gguf, imatrix, bench, quantize, publish; heal and eval: those blocks.

    python -m steps.recipe recipes/demo.yaml     # validate and print the normalized recipe
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from steps.constants import NEEDS_IMATRIX
from steps.errors import RecipeError
from steps.recipe.blocks import BENCH, IMATRIX, _quantize, gates_block, gguf_block, publish_block, text_block
from steps.recipe.eval import validate as eval_block
from steps.recipe.fields import Checker, Field, did_you_mean
from steps.recipe.heal import validate as heal_block
from steps.recipe.matrix import Cell, expand, rank_block
from steps.recipe.merge import _merge
from steps.recipe.reader import read_yaml
from steps.recipe.sources import (MAX_NAME, NAME_RE, Source, _check_model_dir, _check_tokenizer, _missing_paths,
                                   _path_refs, _sources)
from steps.tensors import TEXT_CONFIGS, source_layer_count

__all__ = ["Checker", "Field", "Recipe", "RecipeError", "Source", "TEXT_CONFIGS", "TOP_KEYS", "did_you_mean",
           "discover", "load", "read_yaml", "recipe_files", "source_layer_count"]

TOP_KEYS = ("name", "description", "sources", "merge", "gguf", "imatrix", "quantize", "heal", "bench", "eval",
            "publish", "gates", "matrix")


@dataclass(frozen=True)
class Recipe:
    name: str
    file: Path
    sources: dict[str, Source]
    merge: dict[str, Any]
    gguf: dict[str, Any]
    imatrix: dict[str, Any] | None
    quantize: tuple[str, ...]
    bench: dict[str, Any] | None
    calibration: Path | None = None
    heldout: Path | None = None
    quant_specs: dict[str, dict[str, Any]] = field(default_factory=dict)   # quant name -> llama-quantize options
    heal: dict[str, Any] | None = None                                      # the normalized heal: block
    heal_files: dict[str, Path] = field(default_factory=dict)              # its local data files, by role
    publish: dict[str, Any] | None = None                                   # the normalized publish: block
    eval: dict[str, Any] | None = None                                      # the normalized eval: block
    eval_files: dict[str, Path] = field(default_factory=dict)              # its chat template file, if any
    gates: dict[str, Any] | None = None                                     # the gates: block (only gates given)
    cells: tuple[tuple[Cell, Recipe], ...] = ()      # a sweep (matrix:): each cell and its recipe; self is the first
    rank: dict[str, Any] | None = None               # matrix.rank, normalized
    cell: Cell | None = None                         # in a cell's recipe: which cell it is
    sweep: Any = field(default=None, compare=False, repr=False)   # in a cell's recipe: the sweep's whole recipe


def load(file: str | Path) -> Recipe:
    file = Path(file)
    check = Checker(file)
    raw = read_yaml(file)
    check.mapping(raw, "", TOP_KEYS)
    if "matrix" not in raw:
        return _load(check, raw, file)
    if raw.get("publish") is not None:
        raise check.fail("publish", "a sweep (matrix:) has no one model to publish; once the scoreboard ranks the "
                         "cells, write the chosen cell's settings into a recipe without matrix: and publish that")
    cells = []
    for cell, text in expand(check, raw):
        try:
            cells.append((cell, replace(_load(check, text, file), cell=cell)))
        except RecipeError as exc:
            raise _cell_error(check, cell, exc) from None
    first = cells[0][1]
    heals = all(r.heal is not None for _, r in cells)
    ggufs = [g for g in ([*(first.eval or {}).get("ggufs", [])] + list(first.quantize)
                         + [first.gguf["outtype"].upper()])
             if all(g in (*r.quantize, r.gguf["outtype"].upper()) for _, r in cells)]
    rank = rank_block(check, raw["matrix"].get("rank"), heals=heals, ggufs=ggufs)
    whole = replace(first, cells=tuple(cells), rank=rank, cell=None)
    for _, recipe in cells:
        object.__setattr__(recipe, "sweep", whole)      # frozen: set once, here, before anyone reads it
    return whole


def _cell_error(check: Checker, cell: Cell, exc: RecipeError) -> RecipeError:
    """A cell's error, named by the matrix path whose value it refused (else by the matrix itself)."""
    key = re.sub(r"\[(\d+)\]", r".\1", exc.key)
    path = next((p for p in cell.settings if key == p or key.startswith(p + ".")), None)
    where = f"matrix.{path}" if path else "matrix"
    return check.fail(where, f"cell {cell.name}: {exc.key}: {exc.message}")


def _load(check: Checker, raw: dict[str, Any], file: Path) -> Recipe:
    base = file.resolve().parent
    name = raw.get("name", file.stem)
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise check.fail("name", f"expected 1 to {MAX_NAME} letters, digits, '.', '_' or '-' (starting with a letter "
                         f"or digit), got {name!r}" + ("" if "name" in raw else "; the file name is the default: "
                                                       "rename the file or give name:"))
    if "merge" not in raw:
        raise check.fail("merge", "missing; every recipe declares its merge (mergekit syntax)")
    sources = _sources(check, raw["sources"], base) if raw.get("sources") is not None else {}
    sources.update(_path_refs(raw["merge"], sources, base))
    _missing_paths(check, raw["merge"], sources)
    if not sources:
        raise check.fail("sources", "missing; name each model once under sources: ({path: ...} or {package: ...}),"
                         " or give local model paths in the merge block")
    declared = raw.get("sources") or {}
    for src in sources.values():
        _check_model_dir(check, src, f"sources.{src.name}.path" if src.name in declared else f"merge ({src.name})")
    merge = _merge(check, raw["merge"], sources)
    _check_tokenizer(check, merge, sources)
    gguf = gguf_block(check, raw.get("gguf"))
    imatrix, calibration = text_block(check, raw.get("imatrix"), "imatrix", IMATRIX, "calibration",
                                      "a calibration text file", base)
    quant_specs = _quantize(check, raw.get("quantize", []))
    quantize = tuple(quant_specs)
    if gguf["outtype"].upper() in quantize:
        i = quantize.index(gguf["outtype"].upper())
        raise check.fail(f"quantize[{i}]", f"{quantize[i]} is the unquantized GGUF itself (gguf.outtype: "
                         f"{gguf['outtype']}), which convert already writes; remove it from quantize")
    for i, (qname, spec) in enumerate(quant_specs.items()):
        if spec["type"] in NEEDS_IMATRIX and imatrix is None:
            raise check.fail(f"quantize[{i}]", f"{qname} needs an importance matrix; add an imatrix: block with a "
                             "calibration text, or pick a type such as Q4_K_M")
    bench, heldout = text_block(check, raw.get("bench"), "bench", BENCH, "heldout",
                                "a held-out text file for perplexity", base)
    heal, heal_files = None, {}
    if raw.get("heal") is not None:
        heal, heal_files = heal_block(check, raw["heal"], base)
    publish = publish_block(check, raw.get("publish"), quantize, gguf, heal)
    evals, eval_files = None, {}
    if "eval" in raw:
        evals, eval_files = eval_block(check, raw["eval"], base, quantize, gguf["outtype"], tuple(sources))
    gates = gates_block(check, raw.get("gates"), bench=bench is not None, evals=evals)
    return Recipe(name, file, sources, merge, gguf, imatrix, quantize, bench, calibration, heldout, quant_specs,
                  heal, heal_files, publish, evals, eval_files, gates)


RECIPE_SUFFIXES = (".yaml", ".yml")


def recipe_files(directory: Path) -> list[Path]:
    """Every recipe file of a directory (``*.yaml`` and ``*.yml``), sorted."""
    if not directory.is_dir():
        raise RecipeError(str(directory), "-", "no such recipes directory; create it or set MERGEFORGE_RECIPES to "
                          "the directory that holds your recipes")
    return sorted(p for p in directory.iterdir() if p.suffix in RECIPE_SUFFIXES and not p.name.startswith("."))


def discover(directory: Path) -> tuple[list[Recipe], dict[Path, RecipeError]]:
    """The recipes of a directory that load, and an error for each file that does not (one broken recipe
    must not stop the others). Two files that give one recipe name are both refused."""
    recipes: list[Recipe] = []
    broken: dict[Path, RecipeError] = {}
    for path in recipe_files(directory):
        try:
            recipes.append(load(path))
        except RecipeError as exc:
            broken[path] = exc
    by_name: dict[str, list[Recipe]] = {}
    for r in recipes:
        by_name.setdefault(r.name, []).append(r)
    for name, same in by_name.items():
        if len(same) > 1:
            for r in same:
                others = ", ".join(str(o.file) for o in same if o is not r)
                broken[r.file] = RecipeError(str(r.file), "name", f"'{name}' is also the name of {others}; give "
                                             "each recipe its own name: (the file name is the default)")
    return [r for r in recipes if r.file not in broken], broken
