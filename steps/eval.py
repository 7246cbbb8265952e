"""eval: the capability suite (steps/evalsuite, 44 tests in 9 categories) against llama-server, one GGUF at a time.

``eval:<variant>-<NAME>`` serves one GGUF with llama-server (steps.server: a free loopback port, always stopped),
talks to it through the ``openai`` client, grades every test and writes ``<variant>-<NAME>.eval.json`` (each
test's result, reason and latency, totals per category, tokens/s, wall time) and the server's log beside it. The
key holds the GGUF's digest, the recipe's eval block and the suite's own code (eval_code_digest: a
changed prompt or grader reruns the evals and nothing else); sampling is greedy and seeded by default, so an
unchanged eval restores from the store. Generated code runs in steps.sandbox.

Tests run concurrently on the server's parallel slots (``eval.server.parallel``), except the timed ones
(performance), which run alone afterwards.

    python -m steps.eval demo-Q4_K_M             # run one eval stage of recipes/demo.yaml
"""
from __future__ import annotations

import functools
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps import constants as C
from steps.stage import Declaration

if TYPE_CHECKING:
    from steps.evalsuite import Reply, Test
    from steps.stage import Context, Stage

logger = logging.getLogger(__name__)
CODE_CATEGORIES = ("programming", "agentic", "frontend")     # the categories whose tests run generated code

def build(ctx: Context) -> None:
    from steps import server
    from steps.evalsuite import CATEGORIES, all_tests
    from steps.evalsuite.frontend import browser_version
    stage = ctx.stage
    params = stage.params
    dep = next(d for d in stage.deps if d.split(":", 1)[0] in ("quantize", "convert"))
    rel = ctx.upstream_file(dep.split(":", 1)[0])
    gguf = stage.build_dir / rel
    made = ctx.upstream(dep.split(":", 1)[0])["outputs"].get(rel, {})
    tests = all_tests(params["categories"], params["tests"])
    for noisy in ("httpx", "openai"):            # one INFO line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    options = {**params["server"]}
    if options.get("chat_template"):
        options["chat_template"] = stage.files["chat_template"]
    log = ctx.out / f"{stage.name}.server.log"
    started = time.monotonic()
    with server.serve(gguf, options, log, timeout_s=params["timeout_s"]) as url:
        results = run_suite(url, params, tests)
    wall = time.monotonic() - started
    keep_artifacts(results, ctx.out, stage.name)
    categories = {c: {"passed": sum(r["passed"] for r in results if r["category"] == c),
                      "total": sum(1 for r in results if r["category"] == c),
                      "api": sum(r["passes_api"] for r in results if r["category"] == c),
                      "text": sum(r["passes_text"] for r in results if r["category"] == c)}
                  for c in CATEGORIES if any(r["category"] == c for r in results)}
    tokens = sum(r["completion_tokens"] for r in results)
    seconds = sum(r["generation_s"] for r in results)
    report = {"schema": 2, "gguf": gguf.name, "variant": params["variant"], "name": stage.name,
              "digest": made.get("digest"), "size": made.get("size"), "tool_calls": params["tool_calls"],
              "sandbox": _sandbox_mode(results),
              "browser": browser_version() if any(r["category"] == "frontend" for r in results) else None,
              "passed": sum(r["passed"] for r in results), "total": len(results), "categories": categories,
              "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0, "completion_tokens": tokens,
              "wall_s": round(wall, 2), "settings": {k: v for k, v in params.items() if k != "variant"},
              "tests": results}
    (ctx.out / f"{stage.name}.eval.json").write_text(json.dumps(report, indent=1) + "\n")
    ctx.record["eval"] = {k: report[k] for k in ("passed", "total", "categories", "tokens_per_s", "wall_s")}
    logger.info("eval %s: %d/%d passed in %.0f s", stage.name, report["passed"], report["total"], wall)


def _sandbox_mode(results: list[dict[str, Any]]) -> str | None:
    """How the generated code of this eval was confined (bwrap, or the rlimits fallback without filesystem and
    network isolation), when it ran any: the results say how they were obtained."""
    if not any(r["category"] in CODE_CATEGORIES for r in results):
        return None
    from steps.sandbox import sandbox_mode
    return sandbox_mode()


def graded_both(test: Test, reply: Reply) -> dict[str, Any]:
    """The test's grade when calls written in the reply's text count ("text") and when only the API's tool_calls do
    ("api"). A reply whose calls all came from the API is graded once: both are that grade."""
    text = test.grade(reply)
    return {"text": text, "api": test.grade(reply.api_only()) if reply.wrote_calls() else text}


def run_suite(url: str, params: dict[str, Any], tests: list[Test]) -> list[dict[str, Any]]:
    """Every test against the server at ``url``, concurrently on its ``params["server"]["parallel"]`` slots (the
    timed ones alone afterwards); one result per test, in the order of ``tests``."""
    from steps.evalsuite import Options
    runner = _Runner(url, params, Options(needle_tokens=params["needle_tokens"]))
    parallel = max(1, int(params["server"].get("parallel", 1)))
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        results = list(pool.map(runner.run, [t for t in tests if not t.solo]))
    results += [runner.run(t) for t in tests if t.solo]
    order = {t.id: i for i, t in enumerate(tests)}
    return sorted(results, key=lambda r: order[r["id"]])


def keep_artifacts(results: list[dict[str, Any]], out: Path, name: str) -> None:
    """Each test's artifacts (a frontend test's page and screenshot) as ``<name>.pages/<test id>.<file>`` in ``out``,
    listed in the test's result under "files"."""
    for result in results:
        for file, data in sorted(result.pop("artifacts").items()):
            path = out / C.EVAL_PAGES.format(name=name) / f"{result['id']}.{file}"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            result.setdefault("files", []).append(path.relative_to(out).as_posix())


class _Runner:
    """Sends a test's requests (openai client), grades its reply, and never lets one test stop the others."""

    def __init__(self, url: str, params: dict[str, Any], options: Any) -> None:
        import openai
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="mergeforge-local", timeout=params["timeout_s"],
                                    max_retries=0)
        self.params, self.options = params, options
        self.model = params["server"].get("alias") or "model"

    def ask(self, request: dict[str, Any]) -> Reply:
        from steps.evalsuite import Reply, Timing
        p = self.params
        kwargs = {**request, "model": self.model, "temperature": p["temperature"], "seed": p["seed"],
                  "max_tokens": min(int(request.get("max_tokens") or p["max_tokens"]), p["max_tokens"])}
        if p["thinking"] == "off":
            kwargs["extra_body"] = {"chat_template_kwargs": {"enable_thinking": False}}
        started = time.monotonic()
        if kwargs.get("stream"):
            chunks = list(self.client.chat.completions.create(**kwargs))
            seconds = time.monotonic() - started
            usage = next((c.usage for c in reversed(chunks) if getattr(c, "usage", None)), None)
            n = int(usage.completion_tokens) if usage else 0
            return Reply.from_stream(chunks, Timing(seconds, n, n / seconds if seconds else 0.0))
        completion = self.client.chat.completions.create(**kwargs)
        seconds = time.monotonic() - started
        n = int(completion.usage.completion_tokens) if completion.usage else 0
        return Reply.from_completion(completion, Timing(seconds, n, n / seconds if seconds else 0.0))

    def run(self, test: Test) -> dict[str, Any]:
        from steps.evalsuite import conduct
        outcomes, artifacts = [], {}
        for _ in range(self.params["repetitions"]):
            started = time.monotonic()
            try:
                reply = conduct(test, self.ask, self.options)
                graded = graded_both(test, reply)
                grade = graded[self.params["tool_calls"]]
                passed, reason = grade.passed, grade.reason
                artifacts = artifacts or dict(grade.artifacts)
                timings = [t for turn in reply.turns or (reply,) for t in turn.timings]
                api, text = graded["api"].passed, graded["text"].passed
                finish = (reply.turns[-1] if reply.turns else reply).finish_reason
                source = ("text" if reply.wrote_calls() else
                          "tool_calls" if any(c.source == "tool_calls" for c in reply.all_calls()) else None)
            except Exception as exc:  # noqa: BLE001 - a server error or a grader crash is one failed test
                passed, reason, timings = False, f"{type(exc).__name__}: {exc}"[:500], []
                api = text = False
                source = finish = None
            outcomes.append({"passed": passed, "reason": reason, "latency_s": round(time.monotonic() - started, 3),
                             "completion_tokens": sum(t.completion_tokens for t in timings),
                             "generation_s": sum(t.seconds for t in timings), "api": api, "text": text,
                             "source": source, "finish_reason": finish})
        first = outcomes[0]
        return {"id": test.id, "category": test.category, "passed": all(o["passed"] for o in outcomes),
                "reason": first["reason"] if all(o["passed"] for o in outcomes) else
                next(o["reason"] for o in outcomes if not o["passed"]),
                "passes_api": all(o["api"] for o in outcomes), "passes_text": all(o["text"] for o in outcomes),
                "tool_call_source": next((o["source"] for o in outcomes if o["source"]), None),
                "finish_reason": first["finish_reason"],
                "passes": sum(o["passed"] for o in outcomes), "repetitions": len(outcomes),
                "latency_s": round(sum(o["latency_s"] for o in outcomes) / len(outcomes), 3),
                "completion_tokens": sum(o["completion_tokens"] for o in outcomes),
                "generation_s": round(sum(o["generation_s"] for o in outcomes), 3), "artifacts": artifacts}


@functools.lru_cache(maxsize=1)
def eval_code_digest() -> str:
    """The capability suite's own code (tests, graders, sandbox, runner, server): a changed prompt or grader reruns
    the evals (and the scoreboard) and nothing else. A few small files, read on every doit start that plans evals."""
    import blake3
    here = Path(__file__).resolve().parent
    h = blake3.blake3()
    code = [*(here / "evalsuite").glob("*.py"), *(here / "sandbox").glob("*.py"),
            *(here / n for n in ("eval.py", "server.py"))]
    for path in sorted(code):
        if path.exists():
            h.update(path.relative_to(here).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def tools(stage: Stage) -> dict[str, str]:
    """The suite's code, and the browser's version when frontend tests run (their results depend on it)."""
    found = {"suite": eval_code_digest()}
    if uses_browser(stage.params):
        from steps.evalsuite.frontend import browser_version
        found["browser"] = browser_version()
    return found


def uses_browser(params: dict[str, Any]) -> bool:
    """Whether the eval runs frontend tests (their results depend on the browser, which its key then records)."""
    if params.get("tests") is not None:
        from steps.evalsuite import all_tests
        return any(t.category == "frontend" for t in all_tests(params.get("categories"), params["tests"]))
    return "frontend" in (params.get("categories") or ())




STAGE = Declaration(build=build, tools=tools)

if __name__ == "__main__":
    from steps.plan import find
    from steps.store import execute
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    execute(find(f"eval:{sys.argv[1]}"))
