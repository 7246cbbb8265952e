"""The capability suite through doit against a real llama-server, on a tiny model: every test graded, no server
left behind (also after a kill -9 of doit mid-eval), one eval per GGUF, the suite's own source in the key."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DATA, ROOT, Workspace
from steps.evalsuite.scores import STATUSES

pytestmark = pytest.mark.slow


def eval_recipe(model: Path, quants: str = "[Q8_0]", ggufs: str = "[Q8_0]") -> str:
    return f"""
sources:
  a: {{path: {model}}}
merge:
  merge_method: passthrough
  slices:
    - sources: [{{model: a, layer_range: [0, 4]}}]
quantize: {quants}
bench: {{heldout: {DATA / 'heldout.txt'}, chunks: 2, context: 64}}
eval:
  ggufs: {ggufs}
  max_tokens: 24
  needle_tokens: 200
  server: {{context: 2048, parallel: 2}}
"""


def servers() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "llama-server"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


@pytest.fixture
def evaluated(workspace: Workspace, tiny_llama: Path, llama_cpp) -> Workspace:  # type: ignore[no-untyped-def]
    workspace.write_recipe("tiny", eval_recipe(tiny_llama))
    before = servers()
    first = workspace.doit()
    assert "eval:tiny-Q8_0" in first.executed
    assert servers() <= before, "a llama-server outlived the build"
    assert "HTTP Request" not in first.output, "the HTTP client logs every request"
    return workspace


def test_every_test_is_graded_into_the_scoreboard(evaluated: Workspace) -> None:
    from steps.evalsuite import DEFAULT_CATEGORIES, all_tests
    out = evaluated.build / "tiny"
    report = json.loads((out / "tiny-Q8_0.eval.json").read_text())
    assert report["total"] == len(all_tests()) == 44
    assert all(t["status"] in STATUSES and t["reason"] for t in report["tests"])
    # how each score was obtained: which calls counted, how the generated code was confined, how each reply ended
    assert report["schema"] == 3 and report["tool_calls"] == "api" and report["sandbox"] in ("bwrap", "rlimits")
    assert report["thinking"] == {"setting": "auto", "template_thinks": False, "budget": 0, "prompt_opens": False}
    errors = [t for t in report["tests"] if t["status"] == "error"]
    assert all(re.match(r"[A-Z]\w*(Error|Exception): ", t["reason"]) for t in errors), errors
    assert all(t["finish_reason"] in ("stop", "length", "tool_calls") for t in report["tests"] if t not in errors)
    assert all(t["finish_reason"] is None for t in errors), errors
    # a cut reply is truncated, never failed; the rate is over verdicts
    assert all(t["finish_reason"] == "length" for t in report["tests"] if t["status"] == "truncated")
    assert sum(report["statuses"].values()) == 44 and report["verdicts"] == report["statuses"].get("pass", 0) + \
        report["statuses"].get("fail", 0)
    timings = json.loads((out / "tiny-Q8_0.timings.json").read_text())
    assert set(timings["tests"]) == {t["id"] for t in report["tests"]} and timings["tokens_per_s"] > 0
    assert all({"passes_api", "passes_text", "tool_call_source"} <= set(t) for t in report["tests"])
    assert all({"api", "text"} <= set(c) for c in report["categories"].values())
    assert set(report["categories"]) == set(DEFAULT_CATEGORIES)
    assert "llama-server" in (out / "tiny-Q8_0.server.log").read_text() or (out / "tiny-Q8_0.server.log").stat().st_size
    board = json.loads((out / "scoreboard.json").read_text())
    row = next(r for r in board["models"] if r["type"] == "Q8_0")
    assert row["eval"]["total"] == 44 and row["eval"]["passed"] == report["passed"]
    assert row["eval"]["tokens_per_s"] == timings["tokens_per_s"]
    assert "| Q8_0 TOTAL |" in (out / "scoreboard.md").read_text()


def suite_results(gguf: Path, log: Path, **given: object) -> list[dict]:
    """The suite's results against a fresh llama-server on ``gguf``, without the timings (measurements)."""
    from steps import server
    from steps.eval import _Runner, run_suite
    from steps.evalsuite import all_tests
    from steps.recipe.eval import EVAL
    params = {**{k: f.default for k, f in EVAL.items()}, "categories": None, "tests": None, "variant": "tiny",
              "max_tokens": 24, "needle_tokens": 200, "server": {"context": 2048, "parallel": 2}, **given}
    tests = all_tests(params["categories"], params["tests"])
    with server.serve(gguf, params["server"], log) as url:
        results = run_suite(_Runner(url, params), tests)
    for result in results:
        del result["timing"], result["artifacts"]
    return results


def test_the_same_bytes_give_the_same_results(evaluated: Workspace, tmp_path: Path) -> None:
    """Two fresh servers on one GGUF, tests concurrent on two slots: every test but the two timed ones gets the same
    reply, reason and status (greedy, seeded, and no prompt cache shared between requests)."""
    gguf = evaluated.build / "tiny" / "tiny-Q8_0.gguf"
    first, second = (suite_results(gguf, tmp_path / f"{i}.log") for i in (1, 2))
    untimed = [(a, b) for a, b in zip(first, second, strict=True) if a["category"] != "performance"]
    assert len(untimed) == 42
    assert [a for a, b in untimed if a != b] == [], [(a["id"], a["reason"], b["reason"]) for a, b in untimed if a != b]


THINKING_TEMPLATE = """{%- for message in messages -%}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif -%}
{%- endif -%}"""


def test_a_thinking_template_cut_by_the_context_is_truncated(evaluated: Workspace, tmp_path: Path) -> None:
    """A chat template that opens a think block (as Qwen3's do) on a random model that never closes it: with
    thinking on the server renders the open block, the budget comes on top of each cap, the slot's context ends
    every reply inside its thinking, and each such reply is truncated in its thinking, none failed; with thinking off
    the template closes an empty block and the requests carry no budget."""
    gguf = evaluated.build / "tiny" / "tiny-Q8_0.gguf"
    template = tmp_path / "thinks.jinja"
    template.write_text(THINKING_TEMPLATE)
    server = {"context": 1024, "parallel": 1, "chat_template": str(template)}
    on = suite_results(gguf, tmp_path / "on.log", tests=["ping", "factual_qa", "instruction_following"],
                       server=server, thinking="on")
    assert all(r["status"] == "truncated" and r["finish_reason"] == "length" and r["cut"] == "thinking"
               and r["thinking_tokens"] > 0 for r in on), on
    assert all("2048 thinking tokens" in r["reason"] for r in on), on
    off = suite_results(gguf, tmp_path / "off.log", tests=["ping", "factual_qa", "instruction_following"],
                        server=server, thinking="off")
    assert all(r["thinking_tokens"] == 0 and r["cut"] != "thinking" for r in off), off
    assert all(r["status"] != "truncated" or "+ 0 thinking tokens" in r["reason"] for r in off), off


def qwen35_template(dest: Path) -> Path:
    """Qwen3.5's own chat template (the seed's model family), as llama.cpp's sources ship it (models/templates/ of
    the sdist the toolchain was built from)."""
    import tarfile

    from steps import toolchain
    name = f"{toolchain.SDIST_PACKAGE.replace('-', '_')}-{toolchain.SDIST_VERSION}"
    sdist = toolchain.home() / "downloads" / f"{name}.tar.gz"
    if not sdist.exists():
        pytest.skip("llama.cpp was not built from its source distribution here (MERGEFORGE_LLAMA_CPP)")
    member = f"{name}/vendor/llama.cpp/models/templates/Qwen3.5-4B.jinja"
    with tarfile.open(sdist) as tar:
        dest.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    return dest


@pytest.fixture(scope="module")
def tiny_qwen35_gguf(tmp_path_factory: pytest.TempPathFactory, llama_cpp) -> Path:  # type: ignore[no-untyped-def]
    """A tiny random Qwen3.5 (the real vocabulary: ``<think>`` and ``</think>`` are single tokens, as the
    reasoning budget needs) converted by llama.cpp's converter."""
    from qwen35 import convert, make_qwen35
    root = tmp_path_factory.mktemp("qwen35-eval")
    model = make_qwen35(root / "model", 0, vision=False, mtp="none", text_only=True, logit_scale=50)
    done = convert(model, root / "qwen35.gguf", "--no-mtp")
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "qwen35.gguf"


def test_qwen35s_template_through_each_reasoning_path(tiny_qwen35_gguf: Path, tmp_path: Path) -> None:
    """Qwen3.5's real template, which llama-server knows, on a random Qwen3.5 that never closes its think block:
    auto reads it as thinking (the rendered prompt opens the block), the server returns the thinking apart
    (reasoning_content) and the context ends each reply in its thinking: truncated there, not failed. A budget of 50
    makes the server close the block after 50 tokens, and the reply is then cut in its 24-token answer; with
    --reasoning-format none the thinking comes back in the content, without its opening tag, and is read the
    same way; thinking off: no thinking at all."""
    template = qwen35_template(tmp_path / "qwen35.jinja")
    tests = ["ping", "factual_qa"]

    def results(name: str, **given: object) -> list[dict]:
        server = {"context": 1024, "parallel": 1, "chat_template": str(template), **given.pop("server", {})}
        return suite_results(tiny_qwen35_gguf, tmp_path / f"{name}.log", tests=tests, server=server, **given)

    auto = results("auto")
    assert all(r["status"] == "truncated" and r["cut"] == "thinking" and r["thinking_tokens"] > 500
               and r["answer_tokens"] == 0 and "2048 thinking tokens" in r["reason"] for r in auto), auto
    for name, fmt in (("budget", {}), ("budget-unparsed", {"reasoning_format": "none"})):
        budget = results(name, thinking=50, server=fmt)
        # thinking tokens are the thinking's text tokenized again (/tokenize): within a token of what was generated
        assert all(r["status"] == "truncated" and r["cut"] == "answer" and abs(r["thinking_tokens"] - 50) <= 2
                   and r["thinking_tokens"] + r["answer_tokens"] == 50 + 24 for r in budget), (name, budget)
    off = results("off", thinking="off")
    assert all(r["thinking_tokens"] == 0 and r["cut"] == "answer" and r["reasoning_chars"] == 0 for r in off), off


def test_adding_a_quant_evaluates_only_that_quant(evaluated: Workspace, tiny_llama: Path) -> None:
    evaluated.write_recipe("tiny", eval_recipe(tiny_llama, quants="[Q8_0, Q4_K_M]", ggufs="[Q8_0, Q4_K_M]"))
    again = evaluated.doit()
    assert again.executed == ["quantize:tiny-Q4_K_M", "bench:tiny-Q4_K_M", "eval:tiny-Q4_K_M", "scoreboard:tiny"]


def test_a_changed_test_reruns_the_evals_and_the_scoreboard_only(evaluated: Workspace) -> None:
    module = ROOT / "steps" / "evalsuite" / "basic.py"
    original = module.read_bytes()
    try:
        module.write_bytes(original + b"\n# a changed prompt or grader changes the suite's digest\n")
        again = evaluated.doit()
    finally:
        module.write_bytes(original)
    assert again.executed == ["eval:tiny-Q8_0", "scoreboard:tiny"]


def test_kill_9_of_doit_mid_eval_leaves_no_server(workspace: Workspace, tiny_llama: Path, llama_cpp) -> None:  # type: ignore[no-untyped-def]
    workspace.write_recipe("tiny", eval_recipe(tiny_llama))
    workspace.doit("quantize")
    before = servers()
    proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "eval"], cwd=workspace.path,
                            env=workspace.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not servers() - before:
        time.sleep(0.1)
    started = servers() - before
    assert started, "no llama-server started"
    os.kill(proc.pid, signal.SIGKILL)            # doit alone, as an OOM killer would: its server must go too
    proc.wait()
    deadline = time.time() + 20
    while servers() & started and time.time() < deadline:
        time.sleep(0.2)
    assert not servers() & started, "llama-server outlived doit"
    resumed = workspace.doit("eval")
    assert "eval:tiny-Q8_0" in resumed.executed
    assert json.loads((workspace.build / "tiny" / "tiny-Q8_0.eval.json").read_text())["total"] == 44
    assert not servers() - before


def test_sources_are_evaluated_beside_the_merge_with_the_optional_frontend_category(
        workspace: Workspace, tiny_llama: Path, llama_cpp) -> None:  # type: ignore[no-untyped-def]
    recipe = eval_recipe(tiny_llama).replace("  ggufs: [Q8_0]\n", "  ggufs: [Q8_0]\n  sources: [a]\n"
                                             "  categories: [basic, frontend]\n  tests: [ping, snake_game]\n")
    workspace.write_recipe("tiny", recipe)
    done = workspace.doit()
    assert {"convert:tiny-source-a", "quantize:tiny-source-a-Q8_0", "bench:tiny-source-a-Q8_0",
            "eval:tiny-source-a-Q8_0", "eval:tiny-Q8_0"} <= set(done.executed)
    out = workspace.build / "tiny"
    for name in ("tiny-Q8_0", "tiny-source-a-Q8_0"):
        report = json.loads((out / f"{name}.eval.json").read_text())
        assert [t["id"] for t in report["tests"]] == ["ping", "snake_game"]
        assert report["categories"]["frontend"]["total"] == 1
    board = json.loads((out / "scoreboard.json").read_text())
    assert board["variants"] == ["tiny-source-a", "tiny"] and board["compare"] == ["tiny"]
    rows = {(r["variant"], r["type"]): r for r in board["models"]}
    assert rows[("tiny-source-a", "Q8_0")]["eval"]["tests"][1]["id"] == "snake_game"
    assert rows[("tiny", "Q8_0")]["kld_mean"] is not None and rows[("tiny-source-a", "Q8_0")]["kld_mean"] is not None
    table = (out / "scoreboard.md").read_text()
    assert "| Figure | source a | raw merge |" in table and "| Q8_0 frontend |" in table
    assert (out / "scoreboard.png").read_bytes().startswith(b"\x89PNG") and board["chart"] == "scoreboard.png"
    # the source's GGUF is the source itself: 4 layers of a, as the 4-layer passthrough of a is
    assert rows[("tiny-source-a", "base")]["ppl"] == pytest.approx(rows[("tiny", "base")]["ppl"], rel=1e-3)


def test_an_eval_against_a_server_started_elsewhere(workspace: Workspace, tiny_llama: Path, tmp_path: Path,
                                                    llama_cpp: object) -> None:
    """eval.server.url: the same GGUF and settings on a llama-server started outside the stage give the same
    results as the stage's own server; eval.json says where they came from; the API key's value, read from the
    variable the recipe names, is nowhere in the build; a server serving another GGUF is refused by name."""
    from steps import server
    evaluated = workspace
    few = "  categories: [basic, tools, structured]\n"
    evaluated.write_recipe("tiny", eval_recipe(tiny_llama) + few)
    evaluated.doit()
    out = evaluated.build / "tiny"
    own = json.loads((out / "tiny-Q8_0.eval.json").read_text())

    def pointed_at(url: str) -> str:
        return eval_recipe(tiny_llama).replace("server: {context: 2048, parallel: 2}",
                                               f"server: {{url: '{url}', parallel: 2, api_key_env: MF_TEST_KEY}}") + few

    secret = {"MF_TEST_KEY": "mf-test-secret-7f3a"}
    with server.serve(out / "tiny-Q8_0.gguf", {"context": 2048, "parallel": 2}, tmp_path / "outside.log") as url:
        evaluated.write_recipe("tiny", pointed_at(url))
        done = evaluated.doit("eval:tiny-Q8_0", env=secret)
        assert "eval:tiny-Q8_0" in done.executed, done.output
    theirs = json.loads((out / "tiny-Q8_0.eval.json").read_text())
    assert own["server"] == {"started": True, "program": "llama-server"}
    assert theirs["server"]["started"] is False and theirs["server"]["url"] == url
    assert theirs["server"]["identity"]["model_file"] == "tiny-Q8_0.gguf"
    assert theirs["server"]["identity"]["size"] > 0 and theirs["server"]["identity"]["n_params"] > 0

    def results(report: dict) -> list[tuple[str, str, str]]:
        return [(t["id"], t["status"], t["reason"]) for t in report["tests"] if t["category"] != "performance"]
    assert len(results(own)) == 14 and results(theirs) == results(own)
    for path in [*evaluated.build.rglob("*"), *evaluated.store.rglob("*.json")]:
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert b"mf-test-secret-7f3a" not in path.read_bytes(), path

    with server.serve(out / "tiny-BF16.gguf", {"context": 2048, "parallel": 2}, tmp_path / "other.log") as other:
        evaluated.write_recipe("tiny", pointed_at(other))
        refused = evaluated.doit("eval:tiny-Q8_0", env=secret, check=False)
    lines = [line for line in refused.output.splitlines() if line.startswith("mergeforge: ")]
    assert refused.returncode != 0 and len(lines) == 1, refused.output
    assert f"eval:tiny-Q8_0: the server at {other} serves another model than tiny-Q8_0.gguf: its model file is " \
           "tiny-BF16.gguf; size" in lines[0], lines
