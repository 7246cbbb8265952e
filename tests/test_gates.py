"""Gates (a recipe's ``gates:``): the bar each GGUF must clear to be published. The block's validation, the
scoreboard's judgement of every row, and a real build on a tiny model whose quant fails a gate on purpose:
`doit publish` and its dry run refuse naming the gate, the figure and the threshold; --force publishes and the GGUF
card says which gate failed."""
from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from conftest import DATA, Workspace
from test_publish import FakeHub
from test_recipe import error_for, recipe
from test_scoreboard import board

BENCH = f"bench: {{heldout: {DATA / 'heldout.txt'}, chunks: 4, context: 64}}\n"
EVAL = "eval: {ggufs: [Q4_K_M], categories: [basic, tools]}\n"


# ----------------------------------------------------------------------------------------------- the block

@pytest.mark.parametrize(("gates", "extra", "key", "needle"), [
    ("{kld_max: 0.1}", BENCH, "gates.kld_max", "unknown key (did you mean 'kld_mean_max'?)"),
    ("{}", BENCH, "gates", "expected at least one gate"),
    ("{ppl_ratio_max: 1.05}", "", "gates.ppl_ratio_max", "needs a bench: block"),
    ("{same_top_min: 101}", BENCH, "gates.same_top_min", "expected a number from 0 to 100, got 101"),
    ("{kld_mean_max: -1}", BENCH, "gates.kld_mean_max", "expected a number >= 0, got -1"),
    ("{score_min: 50}", BENCH, "gates.score_min", "needs an eval: block"),
    ("{category_min: {tool: 3}}", EVAL, "gates.category_min.tool",
     "'tool' is not a category the eval runs (did you mean 'tools'?)"),
    ("{category_min: {reasoning: 1}}", EVAL, "gates.category_min.reasoning", "not a category the eval runs"),
    ("{category_min: {tools: 99}}", EVAL, "gates.category_min.tools", "(the eval runs 6 tools tests), got 99"),
    ("{category_min: {}}", EVAL, "gates.category_min", "expected a mapping of categories"),
])
def test_a_bad_gate_names_the_file_and_key(tmp_path: Path, tiny_llama: Path, gates: str, extra: str, key: str,
                                           needle: str) -> None:
    err = error_for(tmp_path, recipe(tiny_llama) + extra + f"gates: {gates}\n")
    assert err.key == key and needle in err.message, err


def test_gates_are_kept_as_given_and_key_only_the_scoreboard(tmp_path: Path, tiny_llama: Path) -> None:
    from steps.plan import plan
    from steps.recipe import load
    path = tmp_path / "r.yaml"
    path.write_text(recipe(tiny_llama) + BENCH)
    before = {st.id: st.params for st in plan(load(path))}
    path.write_text(recipe(tiny_llama) + BENCH + EVAL + "gates: {kld_mean_max: 0.05, category_min: {tools: 4}}\n")
    r = load(path)
    assert r.gates == {"kld_mean_max": 0.05, "category_min": {"tools": 4}}
    after = {st.id: st.params for st in plan(r)}
    assert after["scoreboard:r"]["gates"] == r.gates
    assert all(after[i] == p for i, p in before.items() if i != "scoreboard:r" and i in after)


# ----------------------------------------------------------------------------------------- the judgement

def test_each_row_is_judged_against_every_gate_that_applies() -> None:
    from steps.scoreboard import gate_text, judge, markdown
    b = board()
    b["models"].insert(1, {"variant": "m", "type": "base", "size": 18e9, "ppl": 7.8})
    b["gates"] = {"ppl_ratio_max": 1.02, "kld_mean_max": 0.018, "score_min": 89, "category_min": {"programming": 12}}
    judge(b)
    rows = {(r["variant"], r["type"]): r for r in b["models"]}
    raw, healed, base = rows[("m", "Q4_K_M")], rows[("m-healed", "Q4_K_M")], rows[("m", "base")]
    assert [(g["gate"], g["figure"], g["passed"]) for g in raw["gates"]] == [
        ("ppl_ratio_max", round(8.0 / 7.8, 6), False), ("kld_mean_max", 0.02, False),
        ("score_min", round(100 * 39 / 44, 2), False), ("category_min.programming", 11, False)]
    assert raw["shippable"] is False
    # the healed quant has no unquantized row here: its PPL ratio is not measured, so it is not shippable either
    assert [(g["gate"], g["passed"]) for g in healed["gates"]] == [
        ("ppl_ratio_max", None), ("kld_mean_max", True), ("score_min", True), ("category_min.programming", True)]
    assert healed["shippable"] is False
    # the unquantized GGUF is the reference of PPL ratio and KLD: only the scores apply, and it was not evaluated
    assert [(g["gate"], g["passed"]) for g in base["gates"]] == [("score_min", None),
                                                                 ("category_min.programming", None)]
    assert gate_text(raw["gates"][1]) == "kld_mean_max: KLD 0.02 > 0.018"
    assert gate_text(raw["gates"][3]) == "category_min.programming: tests passed in programming 11 < 12"
    assert gate_text(healed["gates"][2]) == "score_min: tests passed % 90.91 >= 89"
    assert gate_text(healed["gates"][0]) == "ppl_ratio_max: not measured"
    table = markdown(b)
    line = next(x for x in table.splitlines() if x.startswith("| Q4_K_M gates |"))
    cells = [c.strip() for c in line.strip("|").split("|")][1:]
    assert cells[1].startswith("**fails** ppl_ratio_max: PPL ratio 1.02564 > 1.02; kld_mean_max: KLD 0.02 > 0.018")
    assert cells[2] == "**fails** ppl_ratio_max: not measured"


# ------------------------------------------------------------------------------------ a real build, published

def gated(model: Path, gates: str, quants: str = "[BF16, Q8_0]") -> str:
    return f"""
sources:
  a: {{path: {model}}}
merge:
  merge_method: passthrough
  slices:
    - sources: [{{model: a, layer_range: [0, 3]}}]
    - sources: [{{model: a, layer_range: [1, 4]}}]
quantize: [Q8_0]
{BENCH}
publish: {{gguf: org/r-GGUF, quants: {quants}}}
gates: {gates}
"""


@pytest.mark.slow
def test_a_quant_below_its_bar_is_not_published(workspace: Workspace, tiny_llama: Path, llama_cpp: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from steps import publish
    from steps.errors import StepFailed
    from steps.recipe import load
    # Q8_0 of a random tiny model is close to its BF16 but not equal: KLD above 0, the PPL within 10 %
    path = workspace.write_recipe("r", gated(tiny_llama, "{ppl_ratio_max: 1.1, kld_mean_max: 0.0}"))
    refused = workspace.doit("publish:r", "--dry-run", check=False)
    assert refused.returncode != 0 and "scoreboard:r" in refused.executed, refused.output
    board = json.loads((workspace.build / "r" / "scoreboard.json").read_text())
    q8 = next(row for row in board["models"] if row["type"] == "Q8_0")
    kld = q8["kld_mean"]
    assert kld > 0 and q8["shippable"] is False
    assert [(g["gate"], g["passed"]) for g in q8["gates"]] == [("ppl_ratio_max", True), ("kld_mean_max", False)]
    errors = [line for line in refused.output.splitlines() if line.startswith("mergeforge: ")]
    assert errors == [f"mergeforge: publish:r: r-Q8_0.gguf fails gate kld_mean_max: KLD {kld:g} > 0",
                      "mergeforge: publish:r: nothing uploaded; improve the model, change the recipe's gates:, or "
                      "pass --force to publish anyway (the GGUF card says so)"], refused.output
    assert "publish: org/r-GGUF" not in refused.output                      # the dry run printed no plan either
    assert "| Q8_0 gates | **fails** kld_mean_max: KLD" in (workspace.build / "r" / "scoreboard.md").read_text()

    for key, value in workspace.env().items():
        if key.startswith("MERGEFORGE_"):
            monkeypatch.setenv(key, value)
    r = load(path)
    hub = FakeHub()
    with pytest.raises(StepFailed, match="r-Q8_0.gguf fails gate kld_mean_max"):
        publish.publish(r, api=hub)
    assert hub.commits == [] and hub.repos == {}                            # refused before any call to the Hub
    lines = publish.publish(r, api=hub, force=True)
    assert lines[0] == f"publish: --force: r-Q8_0.gguf fails gate kld_mean_max: KLD {kld:g} > 0"
    assert set(hub.repos["org/r-GGUF"]) == {"r-BF16.gguf", "r-Q8_0.gguf", "README.md"}
    card = hub.repos["org/r-GGUF"]["README.md"].decode()
    assert "## Gates" in card and "- `r-BF16.gguf`: passes every gate" in card
    assert f"- `r-Q8_0.gguf`: **fails** kld_mean_max: KLD {kld:g} > 0" in card
    assert "**Published with `--force` although it did not clear its gates:**" in card

    # a bar it clears: the publish goes ahead without --force, and the card says every GGUF passed
    workspace.write_recipe("r", gated(tiny_llama, f"{{kld_mean_max: {2 * kld}}}", quants="[Q8_0]"))
    with socket.socket() as s:                                             # a Hub that does not answer
        s.bind(("127.0.0.1", 0))
        hub_url = f"http://127.0.0.1:{s.getsockname()[1]}"
    done = workspace.doit("publish:r", "--dry-run", check=False, env={"HF_ENDPOINT": hub_url, "HF_HUB_OFFLINE": "0"})
    errors = [line for line in done.output.splitlines() if line.startswith("mergeforge: ")]
    assert errors == ["mergeforge: publish:r: listing org/r-GGUF: cannot reach the Hub (ConnectError); connect and "
                      "run it again (files already uploaded are skipped)"], done.output   # past the gates
    assert done.executed == ["scoreboard:r", "publish:r"]                    # only the scoreboard is judged again
    lines = publish.publish(load(path), api=hub)
    assert not any(line.startswith("publish: --force") for line in lines)
    card = hub.repos["org/r-GGUF"]["README.md"].decode()
    assert "- `r-Q8_0.gguf`: passes every gate" in card and "--force" not in card


def test_a_stale_or_missing_scoreboard_is_not_trusted(tmp_path: Path, tiny_llama: Path) -> None:
    from steps.publish import gate_failures
    from steps.recipe import load
    path = tmp_path / "r.yaml"
    path.write_text(gated(tiny_llama, "{kld_mean_max: 0.1}"))
    r = load(path)
    built = {"convert:r": {"outputs": {"r-BF16.gguf": {"digest": "a" * 64, "size": 1}}, "main": "r-BF16.gguf"},
             "quantize:r-Q8_0": {"outputs": {"r-Q8_0.gguf": {"digest": "b" * 64, "size": 1}}}}
    assert gate_failures(r, None, built)[0] == ["publish:r: no scoreboard.json to check the gates against; run "
                                                "`doit scoreboard:r` (`doit publish:r` builds it first)"]
    other = {"gates": {"kld_mean_max": 0.5}, "models": []}
    assert "was made with other gates" in gate_failures(r, other, built)[0][0]
    rows = [{"variant": "r", "type": "base", "file": "r-BF16.gguf", "digest": "a" * 64, "gates": []},
            {"variant": "r", "type": "Q8_0", "file": "r-Q8_0.gguf", "digest": "c" * 64,
             "gates": [{"gate": "kld_mean_max", "figure": 0.01, "threshold": 0.1, "passed": True}]}]
    lines, _ = gate_failures(r, {"gates": r.gates, "models": rows}, built)
    assert lines == ["publish:r: scoreboard.json scored other bytes than r-Q8_0.gguf holds now; run "
                     "`doit scoreboard:r` (`doit publish:r` builds it first)"]
    lines, results = gate_failures(r, {"gates": r.gates, "models": rows[:1]}, built)
    assert lines == ["publish:r: r-Q8_0.gguf has no row in scoreboard.json, so no gate was measured for it; give "
                     "the recipe a bench: block, or leave it out of publish.quants"]
    assert results == {"r-BF16.gguf": []}
