"""Sweeps (a recipe's ``matrix:``): the cells a matrix expands to and their names, one-line errors for bad
input, a plan that shares every stage the cells agree on, and a real 3-cell sweep over heal steps on a tiny model:
every key built at most once, a new cell builds only its own stages, and one ranked scoreboard over the cells."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import DATA, Workspace
from test_recipe import error_for, recipe

HEAL = """heal:
  quantization: none
  compute_dtype: float32
  lora: {r: 4, alpha: 8, dropout: 0.0}
  train: {learning_rate: 1.0e-3, warmup_steps: 1, batch_size: 2, grad_accum: 1, max_steps: 4,
          max_length: 64, save_steps: 2, logging_steps: 1, seed: 0}
  data:
    - {text: %s, weight: 1.0}
""" % (DATA / "calibration.txt")
BENCH = f"bench: {{heldout: {DATA / 'heldout.txt'}, chunks: 2, context: 64}}\n"
STACK = ("merge:\n  merge_method: passthrough\n  slices:\n"
         "    - sources: [{model: a, layer_range: [0, 3]}]\n    - sources: [{model: a, layer_range: [1, 4]}]\n")


def swept(model: Path, matrix: str, **overrides: str) -> str:
    return recipe(model, merge=STACK, heal=HEAL, bench=BENCH, quantize="quantize: [Q8_0]\n", imatrix="",
                  **overrides) + f"matrix: {matrix}\n"


def load_text(tmp_path: Path, text: str) -> Any:
    from steps.recipe import load
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return load(path)


# ------------------------------------------------------------------------------------------- the cells

def test_cells_are_the_product_less_excludes_plus_includes(tmp_path: Path, tiny_llama: Path) -> None:
    r = load_text(tmp_path, swept(tiny_llama, """
  heal.train.max_steps: [2, 4]
  merge.slices.1.sources.0.layer_range: [[1, 4], [2, 4]]
  exclude: [{heal.train.max_steps: 4, merge.slices.1.sources.0.layer_range: [2, 4]}]
  include: [{heal.train.max_steps: 6}]"""))
    assert [c.name for c, _ in r.cells] == ["max_steps-2+layer_range-1-4", "max_steps-2+layer_range-2-4",
                                            "max_steps-4+layer_range-1-4", "max_steps-6"]
    steps = [cell_recipe.heal["train"]["max_steps"] for _, cell_recipe in r.cells]
    assert steps == [2, 2, 4, 6]
    assert r.cells[1][1].merge["slices"][1]["sources"][0]["layer_range"] == [2, 4]
    assert r.cells[3][1].merge["slices"][1]["sources"][0]["layer_range"] == [1, 4]   # the recipe's own value
    assert r.rank == {"by": ["score", "ppl"], "gguf": "Q8_0", "variant": "final"}


def test_a_value_that_is_a_block_is_named_by_its_place(tmp_path: Path, tiny_llama: Path) -> None:
    r = load_text(tmp_path, swept(tiny_llama, """
  merge.slices:
    - [{sources: [{model: a, layer_range: [0, 4]}]}]
    - [{sources: [{model: a, layer_range: [0, 3]}]}, {sources: [{model: a, layer_range: [1, 4]}]}]"""))
    assert [c.name for c, _ in r.cells] == ["slices-v1", "slices-v2"]
    assert [len(cr.merge["slices"]) for _, cr in r.cells] == [1, 2]


@pytest.mark.parametrize(("matrix", "key", "needle"), [
    ("{heal.train.max_step: [2, 4]}", "matrix.heal.train.max_step",
     "cell max_step-2: heal.train.max_step: unknown key (did you mean 'max_steps'?)"),
    ("{heal.trains.max_steps: [2]}", "matrix.heal.trains.max_steps",
     "heal.trains does not exist in the recipe (did you mean 'train'?)"),
    ("{merge.slices.5.sources: [[]]}", "matrix.merge.slices.5.sources",
     "merge.slices.5 does not exist in the recipe (a list of 2: index it 0 to 1)"),
    ("{heal.train.max_steps: []}", "matrix.heal.train.max_steps", "expected a non-empty list of values"),
    ("{heal.train.max_steps: [4, -1]}", "matrix.heal.train.max_steps",
     "cell max_steps-_1: heal.train.max_steps: expected a positive integer"),
    ("{sources.a.path: [x]}", "matrix.sources.a.path", "'sources' is not one of them"),
    ("{heal.train.max_steps: [2], rank: {by: [speed]}}", "matrix.rank.by[0]", "unknown figure 'speed'"),
    ("{heal.train.max_steps: [2], rank: {gguf: Q4_K_M}}", "matrix.rank.gguf", "not a GGUF every cell makes"),
    ("{heal.train.max_steps: [2], exclude: [{heal.train.max_steps: 2}]}", "matrix.exclude", "excludes every cell"),
    ("{heal.train.max_steps: [2], exclude: [{heal.lora.r: 2}]}", "matrix.exclude[0].heal.lora.r",
     "not a path of the matrix"),
    ("[heal.train.max_steps]", "matrix", "expected a mapping of dotted recipe paths to lists of values"),
    ("{gguf.outtype: [bf16, f16], quantize: [[]]}\ngguf: {outtype: bf16}", "matrix.rank.gguf",
     "the cells make no GGUF in common"),
])
def test_a_bad_matrix_names_the_file_and_key(tmp_path: Path, tiny_llama: Path, matrix: str, key: str,
                                             needle: str) -> None:
    err = error_for(tmp_path, swept(tiny_llama, matrix))
    assert err.key == key and needle in err.message, str(err)


def test_a_sweep_is_not_published(tmp_path: Path, tiny_llama: Path) -> None:
    err = error_for(tmp_path, swept(tiny_llama, "{heal.train.max_steps: [2, 4]}",
                                    publish="publish: {gguf: org/r-GGUF}\n"))
    assert err.key == "publish" and "a sweep (matrix:) has no one model to publish" in err.message


# ------------------------------------------------------------------------------------------- the plan

def test_the_cells_share_every_stage_they_agree_on(tmp_path: Path, tiny_llama: Path) -> None:
    from steps.plan import plan
    r = load_text(tmp_path, swept(tiny_llama, "{heal.train.max_steps: [2, 4, 6]}"))
    stages = plan(r)
    ids = [st.id for st in stages]
    assert len(ids) == len(set(ids))
    raw = ["fetch:r", "merge:r", "convert:r", "quantize:r-Q8_0", "bench:r", "bench:r-Q8_0"]
    assert set(raw) <= set(ids)
    for steps in (2, 4, 6):
        cell = f"r@max_steps-{steps}"
        assert {f"heal:{cell}", f"convert:{cell}-healed", f"quantize:{cell}-healed-Q8_0",
                f"bench:{cell}-healed-Q8_0"} <= set(ids)
    by = {st.id: st for st in stages}
    heal = by["heal:r@max_steps-4"]
    assert heal.deps == ("merge:r",) and heal.params["train"]["max_steps"] == 4
    assert heal.outputs == ("healed@max_steps-4/config.json",) and heal.cell == "max_steps-4"
    convert = by["convert:r@max_steps-4-healed"]
    assert convert.params["model"] == "healed@max_steps-4" and convert.outputs == ("r@max_steps-4-healed-BF16.gguf",)
    assert by["merge:r"].cell == "" and by["merge:r"].outputs == ("merged/config.json",)
    board = by["scoreboard:r"]
    assert board.params["variants"] == ["r", "r@max_steps-2-healed", "r@max_steps-4-healed", "r@max_steps-6-healed"]
    assert [(c["name"], c["bench"]) for c in board.params["cells"]] == [
        (f"max_steps-{s}", f"r@max_steps-{s}-healed") for s in (2, 4, 6)]


def test_a_merge_sweep_names_only_what_it_changes(tmp_path: Path, tiny_llama: Path) -> None:
    from steps.plan import plan
    r = load_text(tmp_path, swept(tiny_llama, "{merge.slices.1.sources.0.layer_range: [[1, 4], [2, 4]], "
                                              "heal.train.max_steps: [2, 4]}"))
    ids = {st.id for st in plan(r)}
    assert {"merge:r@layer_range-1-4", "merge:r@layer_range-2-4", "convert:r@layer_range-2-4",
            "heal:r@layer_range-2-4+max_steps-4", "bench:r@layer_range-1-4+max_steps-2-healed-Q8_0"} <= ids
    assert "fetch:r" in ids and not any(i.startswith("merge:r@max_steps") for i in ids)


def test_one_cell_is_a_plain_recipe(tmp_path: Path, tiny_llama: Path) -> None:
    """A recipe without matrix: plans as before: no cell in any name, key or file."""
    from steps.plan import plan
    path = tmp_path / "r.yaml"
    path.write_text(recipe(tiny_llama, merge=STACK, heal=HEAL, bench=BENCH, imatrix=""))
    from steps.recipe import load
    stages = plan(load(path))
    assert all("@" not in st.id and st.cell == "" for st in stages)
    assert "cells" not in next(st for st in stages if st.kind == "scoreboard").params


def test_the_demo_sweep_shares_the_merge_and_the_sources(tmp_path: Path) -> None:
    """examples/demo-sweep.yaml (docs/sweeps.md): the demo with its heal's steps swept."""
    from steps.plan import plan
    from steps.recipe import load
    r = load(Path(__file__).resolve().parent.parent / "examples" / "demo-sweep.yaml")
    ids = [st.id for st in plan(r)]
    n = "demo-sweep"
    assert [c.name for c, _ in r.cells] == ["max_steps-4", "max_steps-8", "max_steps-16"]
    assert {f"merge:{n}", f"eval:{n}-Q4_K_M", f"eval:{n}-source-smollm2-Q4_K_M"} <= set(ids)
    assert [i for i in ids if i.startswith("heal:")] == [f"heal:{n}@max_steps-{s}" for s in (4, 8, 16)]
    (board,) = [st for st in plan(r) if st.kind == "scoreboard"]
    assert board.params["variants"] == [f"{n}-source-smollm2", n, *(f"{n}@max_steps-{s}-healed" for s in (4, 8, 16))]
    assert [i for i in ids if i.startswith("eval:")] == [
        f"eval:{n}-source-smollm2-Q4_K_M", f"eval:{n}-Q4_K_M",
        *(f"eval:{n}@max_steps-{s}-healed-Q4_K_M" for s in (4, 8, 16))]


# ------------------------------------------------------------------------------------- a real sweep

@pytest.mark.slow
def test_a_sweep_builds_each_shared_stage_once(workspace: Workspace, tiny_llama: Path, llama_cpp: Any) -> None:
    workspace.write_recipe("r", swept(tiny_llama, "{heal.train.max_steps: [2, 4, 6]}"))
    listed = workspace.doit("list", "--all").output
    assert "heal:r@max_steps-6" in listed and "bench:r@max_steps-2-healed-Q8_0" in listed
    workspace.doit()
    events = workspace.events("r")
    built = [e["stage"] for e in events if e["action"] == "built"]
    keys = [e["key"] for e in events if e["action"] == "built"]
    assert len(keys) == len(set(keys)), "a key was built twice"
    assert built.count("merge:r") == 1 and built.count("convert:r") == 1
    assert sorted(b for b in built if b.startswith("heal:")) == [f"heal:r@max_steps-{s}" for s in (2, 4, 6)]
    out = workspace.build / "r"
    assert (out / "merged" / "config.json").exists() and (out / "healed@max_steps-4" / "config.json").exists()
    assert json.loads((out / "loss@max_steps-6.json").read_text())[-1]["step"] == 6
    assert json.loads((out / "adapter@max_steps-2" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "merged"
    board = json.loads((out / "scoreboard.json").read_text())
    cells = board["cells"]
    assert sorted(c["name"] for c in cells) == [f"max_steps-{s}" for s in (2, 4, 6)]
    assert [c["rank"] for c in cells] == sorted(c["rank"] for c in cells) and cells[0]["rank"] == 1
    ppl = [c["ppl"] for c in cells]
    assert all(p is not None and p > 0 for p in ppl) and ppl == sorted(ppl)      # no eval: PPL ranks them
    assert all(c["settings"] == {"heal.train.max_steps": int(c["name"].split("-")[1])} for c in cells)
    assert len({c["size"] for c in cells}) == 1
    md = (out / "scoreboard.md").read_text()
    assert "## Cells: Q8_0 of the final model, ranked by score, ppl" in md
    assert f"| 1 | {cells[0]['name']} |" in md and "**best**" in md
    lock = json.loads((out / "lock.json").read_text())
    assert "heal:r@max_steps-6" in lock["stages"] and "merge:r" in lock["stages"]

    # adding a value builds only the new cell's stages (and the scoreboard); removing it again builds nothing
    workspace.write_recipe("r", swept(tiny_llama, "{heal.train.max_steps: [2, 4, 6, 8]}"))
    more = workspace.doit()
    assert sorted(more.executed) == sorted(["heal:r@max_steps-8", "convert:r@max_steps-8-healed",
                                            "quantize:r@max_steps-8-healed-Q8_0", "bench:r@max_steps-8-healed",
                                            "bench:r@max_steps-8-healed-Q8_0", "scoreboard:r"]), more.output
    workspace.write_recipe("r", swept(tiny_llama, "{heal.train.max_steps: [2, 4, 6]}"))
    fewer = workspace.doit()
    assert fewer.executed == ["scoreboard:r"], fewer.output
    assert workspace.events("r")[-1]["action"] == "restored"
    assert len(json.loads((out / "scoreboard.json").read_text())["cells"]) == 3
