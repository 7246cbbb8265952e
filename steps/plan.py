"""Plan: a recipe becomes a list of stages, each with its parameters, inputs, tools and paths. The one place
that knows the graph: which stages a recipe has and what each one reads.

Planning is cheap (no hashing of artifacts, no torch): dodo.py calls it on every `doit list`.

    python -m steps.plan recipes/demo.yaml       # print the plan
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from steps import constants as C
from steps import settings
from steps.recipe import Recipe, load, recipe_files
from steps.stage import Stage


def variants(recipe: Recipe) -> list[tuple[str, str, str]]:
    """The models a recipe turns into GGUFs: (variant name, the stage that makes it, its directory in build/).
    The raw merge is ``<recipe>``; the healed model, when the recipe heals, ``<recipe>-healed``."""
    n = recipe.name
    found = [(n, f"merge:{n}", C.MERGED_DIR)]
    if recipe.heal is not None:
        found.append((f"{n}{C.HEALED_SUFFIX}", f"heal:{n}", C.HEALED_DIR))
    return found


def source_variants(recipe: Recipe) -> list[tuple[str, str]]:
    """The source models the recipe evaluates beside the merge (``eval.sources``): (variant name, source name).
    Each is converted, quantized to the evaluated quants, benched and evaluated like the merge, as
    ``<recipe>-source-<name>``."""
    names = (recipe.eval or {}).get("sources") or []
    return [(f"{recipe.name}{C.SOURCE_INFIX}{name}", name) for name in names]


def plan(recipe: Recipe) -> list[Stage]:
    """The recipe's stages in build order. A sweep (``matrix:``): every cell's, each stage once however many cells
    share it, and one scoreboard over them all."""
    if recipe.cells:
        return _sweep(recipe)
    return _single(recipe)


def _single(recipe: Recipe, *, scoreboard: bool = True) -> list[Stage]:
    n = recipe.name
    stages = [Stage("fetch", n, recipe, {k: s.spec for k, s in recipe.sources.items()},
                    outputs=tuple(f"{C.SOURCES_DIR}/{k}/config.json" for k, s in recipe.sources.items()
                                  if s.kind == "package" or s.spec.get("allow_pickle")))]
    stages.append(Stage("merge", n, recipe, recipe.merge, deps=(f"fetch:{n}",),
                        outputs=(f"{C.MERGED_DIR}/config.json",)))
    if recipe.heal is not None:
        stages.append(Stage("heal", n, recipe, recipe.heal, deps=(f"merge:{n}",), files=recipe.heal_files,
                            outputs=(f"{C.HEALED_DIR}/config.json",)))
    for v, source in source_variants(recipe):
        evaluated = set(recipe.eval["ggufs"]) if recipe.eval else set()
        stages += _variant_stages(recipe, v, f"fetch:{n}", {"source": source},
                                  quants=[q for q in recipe.quantize if q in evaluated])
    for v, made_by, model_dir in variants(recipe):
        stages += _variant_stages(recipe, v, made_by, {"model": model_dir})
    gathered = tuple(st.id for st in stages if st.kind in ("bench", "eval"))
    if gathered and scoreboard:
        merged = [v for v, _, _ in variants(recipe)]
        board = {"variants": [v for v, _ in source_variants(recipe)] + merged, "compare": merged}
        if recipe.gates is not None:
            board["gates"] = recipe.gates
        stages.append(Stage("scoreboard", n, recipe, board,
                            deps=gathered, outputs=(C.SCOREBOARD, C.SCOREBOARD_MD)))
    return stages


def _variant_stages(recipe: Recipe, v: str, made_by: str, model: dict[str, str],
                    quants: list[str] | None = None) -> list[Stage]:
    """convert, imatrix, each quant (``quants``, default every one), bench and eval of one variant. ``model``:
    {"model": its directory in build/} or {"source": a source's name} (read where fetch put it)."""
    gguf_name = C.BF16_GGUF.format(recipe=v, outtype=recipe.gguf["outtype"].upper())
    stages = [Stage("convert", v, recipe, {**recipe.gguf, "recipe": v, **model}, deps=(made_by,),
                    outputs=(gguf_name,))]
    upstream: tuple[str, ...] = (f"convert:{v}",)
    if recipe.imatrix is not None:
        params = {k: val for k, val in recipe.imatrix.items() if k != "calibration"}
        stages.append(Stage("imatrix", v, recipe, params, deps=upstream,
                            files={"calibration": recipe.calibration} if recipe.calibration else {},
                            outputs=(C.IMATRIX_FILE.format(recipe=v),)))
        upstream = (*upstream, f"imatrix:{v}")
    wanted = list(recipe.quantize if quants is None else quants)
    quant_ids = []
    for qname in wanted:
        spec = recipe.quant_specs.get(qname, {"type": qname})
        if "split_max_size" in recipe.gguf:
            spec = {**spec, "split_max_size": recipe.gguf["split_max_size"]}
        quant = Stage("quantize", f"{v}-{qname}", recipe, spec, deps=upstream,
                      outputs=(C.QUANT_GGUF.format(recipe=v, qtype=qname),))
        quant_ids.append(quant.id)
        stages.append(quant)
    if recipe.bench is not None:
        params = {**{k: val for k, val in recipe.bench.items() if k != "heldout"}, "variant": v}
        files = {"heldout": recipe.heldout} if recipe.heldout else {}
        stages.append(Stage("bench", v, recipe, params, deps=(f"convert:{v}",), files=files,
                            outputs=(C.BENCH_FILE.format(name=v), C.BENCH_LOGPROBS.format(variant=v))))
        for quant in quant_ids:
            name = quant.split(":", 1)[1]
            stages.append(Stage("bench", name, recipe, params, deps=(f"bench:{v}", quant), files=files,
                                outputs=(C.BENCH_FILE.format(name=name),)))
    if recipe.eval is not None:
        outtype = recipe.gguf["outtype"].upper()
        for gguf in [g for g in recipe.eval["ggufs"] if g in wanted or g == outtype]:
            name = f"{v}-{gguf}"
            made_by = f"convert:{v}" if gguf == outtype else f"quantize:{name}"
            stages.append(Stage("eval", name, recipe, {**recipe.eval, "ggufs": None, "sources": None, "variant": v},
                                deps=(made_by,), files=recipe.eval_files,
                                outputs=(C.EVAL_FILE.format(name=name), C.EVAL_LOG.format(name=name),
                                         C.EVAL_TIMINGS.format(name=name))))
    return stages


# What of the recipe each kind of stage reads (top-level blocks); a stage also depends on all its upstream reads.
READS = {"fetch": (), "merge": ("merge",), "heal": ("heal",), "convert": ("gguf",), "imatrix": ("imatrix",),
         "quantize": ("quantize", "gguf"), "bench": ("bench",), "eval": ("eval",)}


def _sweep(recipe: Recipe) -> list[Stage]:
    """Plan each cell as a recipe of its own, then name each stage by the settings it depends on: a stage whose
    upstream chain reads none of the swept blocks keeps its plain name and is built once for all cells
    (``merge:demo`` in a sweep over heal steps); one that does is ``<kind>:<recipe>@<those settings><rest>``
    (``heal:demo@max_steps-8``, ``eval:demo@max_steps-8-healed-Q8_0``), its files and directories named alike.
    Two cells that give a stage one name give it equal parameters, inputs and upstream stages, or the stage is
    named by the whole cell instead."""
    n = recipe.name
    cells = [(cell, _single(r, scoreboard=False)) for cell, r in recipe.cells]
    relevant: dict[tuple[str, str], set[str]] = {}
    whole: set[tuple[str, str]] = set()            # (cell, stage id) named by the whole cell
    while True:
        final: dict[tuple[str, str], Stage] = {}
        for cell, stages in cells:
            for st in stages:
                paths = {p for p in cell.settings if p.split(".")[0] in READS[st.kind]}
                for dep in st.deps:
                    paths |= relevant[(cell.name, dep)]
                if (cell.name, st.id) in whole:
                    paths = set(cell.settings)
                relevant[(cell.name, st.id)] = paths
                final[(cell.name, st.id)] = _named(st, n, cell.tag(paths),
                                                   tuple(final[(cell.name, d)] for d in st.deps))
        groups: dict[str, list[tuple[str, str]]] = {}
        for (cname, sid), st in final.items():
            groups.setdefault(st.id, []).append((cname, sid))
        clash = {member for members in groups.values() if len({_signature(final[m]) for m in members}) > 1
                 for member in members if member not in whole}
        if not clash:
            break
        whole |= clash
    stages: dict[str, Stage] = {}
    for (_, _), st in final.items():
        stages.setdefault(st.id, st)
    board_cells = []
    variants: list[str] = [v for v, _ in source_variants(recipe)]
    merged: list[str] = []
    for (cell, own), (_, cell_recipe) in zip(cells, recipe.cells, strict=True):
        named = [final[(cell.name, st.id)] for st in own]
        for st in named:
            if st.kind in ("bench", "eval") and st.params["variant"] not in variants + merged:
                (variants if C.SOURCE_INFIX in st.params["variant"] else merged).append(st.params["variant"])
        board_cells.append({"name": cell.name, "settings": cell.settings, **_ranked(cell_recipe, own, named)})
    gathered = tuple(st.id for st in stages.values() if st.kind in ("bench", "eval"))
    ordered = list(stages.values())
    if gathered:
        board: dict[str, Any] = {"variants": variants + merged, "compare": [], "cells": board_cells,
                                 "rank": recipe.rank}
        if recipe.gates is not None:
            board["gates"] = recipe.gates
        ordered.append(Stage("scoreboard", n, recipe, board, deps=gathered, outputs=(C.SCOREBOARD, C.SCOREBOARD_MD)))
    return ordered


def _ranked(recipe: Recipe, own: list[Stage], named: list[Stage]) -> dict[str, Any]:
    """Where the scoreboard finds a cell's figures: the variants its bench and eval of the ranked GGUF wrote
    (``recipe``: the cell's)."""
    rank = recipe.sweep.rank
    n = recipe.name
    healed = rank["variant"] == "healed" or (rank["variant"] == "final" and recipe.heal is not None)
    base = n + (C.HEALED_SUFFIX if healed else "")
    gguf = rank.get("gguf", "")
    outtype = recipe.gguf["outtype"].upper()
    found: dict[str, Any] = {"gguf": gguf, "type": "base" if gguf == outtype else gguf}
    for plain, st in zip(own, named, strict=True):
        if st.kind == "bench" and plain.name == (base if gguf == outtype else f"{base}-{gguf}"):
            found["bench"] = st.params["variant"]
        if st.kind == "eval" and plain.name == f"{base}-{gguf}":
            found["eval"] = st.params["variant"]
    return found


def _named(st: Stage, n: str, tag: str, deps: tuple[Stage, ...]) -> Stage:
    """The stage of one cell under its sweep name: ``tag`` after the recipe's name in its name, its variant's and
    its files' names; its upstream stages by their sweep names."""
    def name(x: str) -> str:
        return f"{n}@{tag}{x[len(n):]}" if tag and x.startswith(n) else x

    def output(rel: str) -> str:
        top, _, rest = rel.partition("/")
        if tag and rest and top in (C.MERGED_DIR, C.HEALED_DIR):
            return f"{top}@{tag}/{rest}"
        return name(rel)

    params = dict(st.params)
    if st.kind == "convert":
        params["recipe"] = name(params["recipe"])
        if "model" in params:
            (made,) = deps
            params["model"] = made.outputs[0].split("/", 1)[0]
    if st.kind in ("bench", "eval"):
        params["variant"] = name(params["variant"])
    return replace(st, name=name(st.name), params=params, deps=tuple(d.id for d in deps),
                   outputs=tuple(output(o) for o in st.outputs), cell=tag)


def _signature(st: Stage) -> str:
    return json.dumps({"kind": st.kind, "params": st.params, "deps": st.deps, "outputs": st.outputs,
                       "files": {k: str(v) for k, v in st.files.items()}}, sort_keys=True, default=str)


def find(stage_id: str, recipes_dir: Path | None = None) -> Stage:
    """The stage with this id, planned anew from the recipes (for running one stage by hand)."""
    for path in recipe_files(recipes_dir or settings.recipes_dir()):
        for stage in plan(load(path)):
            if stage.id == stage_id:
                return stage
    raise KeyError(stage_id)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        for st in plan(load(arg)):
            print(json.dumps({"id": st.id, "deps": st.deps, "params": st.params,
                              "files": {k: str(v) for k, v in st.files.items()}, "outputs": st.outputs}))
