"""eval: the capability suite (steps/evalsuite, 44 tests in 9 categories) against llama-server, one GGUF at a time.

``eval:<variant>-<NAME>`` serves one GGUF with llama-server (steps.server: a free loopback port, always stopped),
talks to it through the ``openai`` client, grades every test and writes ``<variant>-<NAME>.eval.json`` (each
test's result, reason and latency, totals per category, tokens/s, wall time) and the server's log beside it. The
key holds the GGUF's digest, the recipe's eval block and the suite's own code (steps.plan.eval_code_digest: a
changed prompt or grader reruns the evals and nothing else); sampling is greedy and seeded by default, so an
unchanged eval restores from the store. Generated code runs in steps.sandbox.

Tests run concurrently on the server's parallel slots (``eval.server.parallel``), except the timed ones
(performance), which run alone afterwards.

    python -m steps.eval demo-Q4_K_M             # run one eval stage of recipes/demo.yaml
"""
from __future__ import annotations

import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps import constants as C

if TYPE_CHECKING:
    from steps.evalsuite import Reply, Test
    from steps.store import Context

logger = logging.getLogger(__name__)

EVAL_KEYS = ("ggufs", "sources", "categories", "tests", "max_tokens", "repetitions", "temperature", "seed",
             "timeout_s", "needle_tokens", "thinking", "server")
DEFAULTS: dict[str, Any] = {"sources": [], "categories": None, "tests": None, "max_tokens": 512, "repetitions": 1,
                            "temperature": 0.0, "seed": 0, "timeout_s": 300, "needle_tokens": 1500,
                            "thinking": "on", "server": {}}
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
                      "total": sum(1 for r in results if r["category"] == c)}
                  for c in CATEGORIES if any(r["category"] == c for r in results)}
    tokens = sum(r["completion_tokens"] for r in results)
    seconds = sum(r["generation_s"] for r in results)
    report = {"schema": 1, "gguf": gguf.name, "variant": params["variant"], "name": stage.name,
              "digest": made.get("digest"), "size": made.get("size"),
              "browser": browser_version() if any(r["category"] == "frontend" for r in results) else None,
              "passed": sum(r["passed"] for r in results), "total": len(results), "categories": categories,
              "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0, "completion_tokens": tokens,
              "wall_s": round(wall, 2), "settings": {k: v for k, v in params.items() if k != "variant"},
              "tests": results}
    (ctx.out / f"{stage.name}.eval.json").write_text(json.dumps(report, indent=1) + "\n")
    ctx.record["eval"] = {k: report[k] for k in ("passed", "total", "categories", "tokens_per_s", "wall_s")}
    logger.info("eval %s: %d/%d passed in %.0f s", stage.name, report["passed"], report["total"], wall)


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
                grade = test.grade(reply)
                passed, reason = grade.passed, grade.reason
                artifacts = artifacts or dict(grade.artifacts)
                timings = [t for turn in reply.turns or (reply,) for t in turn.timings]
            except Exception as exc:  # noqa: BLE001 - a server error or a grader crash is one failed test
                passed, reason, timings = False, f"{type(exc).__name__}: {exc}"[:500], []
            outcomes.append({"passed": passed, "reason": reason, "latency_s": round(time.monotonic() - started, 3),
                             "completion_tokens": sum(t.completion_tokens for t in timings),
                             "generation_s": sum(t.seconds for t in timings)})
        first = outcomes[0]
        return {"id": test.id, "category": test.category, "passed": all(o["passed"] for o in outcomes),
                "reason": first["reason"] if all(o["passed"] for o in outcomes) else
                next(o["reason"] for o in outcomes if not o["passed"]),
                "passes": sum(o["passed"] for o in outcomes), "repetitions": len(outcomes),
                "latency_s": round(sum(o["latency_s"] for o in outcomes) / len(outcomes), 3),
                "completion_tokens": sum(o["completion_tokens"] for o in outcomes),
                "generation_s": round(sum(o["generation_s"] for o in outcomes), 3), "artifacts": artifacts}


def uses_browser(params: dict[str, Any]) -> bool:
    """Whether the eval runs frontend tests (their results depend on the browser, which its key then records)."""
    if params.get("tests") is not None:
        from steps.evalsuite import all_tests
        return any(t.category == "frontend" for t in all_tests(params.get("categories"), params["tests"]))
    return "frontend" in (params.get("categories") or ())


def validate(check: Any, value: Any, base: Path, quantize: tuple[str, ...], outtype: str,
             categories: tuple[str, ...], sources: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Path]]:
    """The recipe's ``eval:`` block, normalized (every default filled), and its files (a chat template).
    ``sources``: source models converted, quantized (to the evaluated quants), benched and evaluated the same way, so
    the scoreboard can show them beside the merge."""
    from steps.server import SERVER_DEFAULTS
    spec = dict(check.mapping(value if value is not None else {}, "eval", EVAL_KEYS))
    out = {**DEFAULTS, **spec}
    choices = (*quantize, outtype.upper())
    out.setdefault("ggufs", list(quantize))
    if not isinstance(out["ggufs"], list) or not all(isinstance(g, str) for g in out["ggufs"]):
        raise check.fail("eval.ggufs", f"expected a list of GGUF names from {', '.join(choices)}")
    out["ggufs"] = [g.upper() if g.upper() in (c.upper() for c in choices) else g for g in out["ggufs"]]
    for i, name in enumerate(out["ggufs"]):
        if name not in choices:
            raise check.fail(f"eval.ggufs[{i}]", f"{name!r} is not a GGUF of this recipe; one of {', '.join(choices)}")
    if not isinstance(out["sources"], list) or not all(isinstance(x, str) for x in out["sources"]):
        raise check.fail("eval.sources", "expected a list of source names")
    for i, name in enumerate(out["sources"]):
        if name not in sources:
            raise check.fail(f"eval.sources[{i}]", f"{name!r} is not a source of this recipe; one of "
                             f"{', '.join(sources)}")
    if len(set(out["sources"])) != len(out["sources"]):
        raise check.fail("eval.sources", "a source is listed twice")
    for key, known in (("categories", categories), ("tests", None)):
        if out[key] is not None:
            if not isinstance(out[key], list) or not out[key] or not all(isinstance(x, str) for x in out[key]):
                raise check.fail(f"eval.{key}", "expected a non-empty list of names")
            for i, name in enumerate(out[key]):
                if known is not None and name not in known:
                    raise check.fail(f"eval.{key}[{i}]", f"unknown category {name!r}; one of {', '.join(known)}")
    if out["tests"] is not None:
        from steps.evalsuite import all_tests
        try:
            all_tests(out["categories"], out["tests"])
        except ValueError as exc:
            raise check.fail("eval.tests", str(exc)) from None
    for key in ("max_tokens", "repetitions", "timeout_s", "needle_tokens"):
        check.positive_int(out[key], f"eval.{key}")
    if not isinstance(out["temperature"], (int, float)) or isinstance(out["temperature"], bool) \
            or not 0 <= out["temperature"] <= 2:
        raise check.fail("eval.temperature", f"expected a number from 0 to 2, got {out['temperature']!r}")
    check.typed(out["seed"], "eval.seed", int, "an integer")
    if out["thinking"] is False or out["thinking"] is True:                # YAML reads on/off as booleans
        out["thinking"] = "on" if out["thinking"] else "off"
    if out["thinking"] not in ("on", "off"):
        raise check.fail("eval.thinking", f"expected on or off, got {out['thinking']!r}")
    server = dict(check.mapping(out["server"] or {}, "eval.server", tuple(SERVER_DEFAULTS)))
    for key in ("context", "batch", "ubatch", "parallel"):
        if key in server:
            check.positive_int(server[key], f"eval.server.{key}")
    if isinstance(server.get("flash_attn"), bool):
        server["flash_attn"] = "on" if server["flash_attn"] else "off"
    if server.get("flash_attn", "auto") not in ("on", "off", "auto"):
        raise check.fail("eval.server.flash_attn", "expected on, off or auto")
    files = {}
    if server.get("chat_template"):
        files["chat_template"] = check.existing_file(server["chat_template"], "eval.server.chat_template", base)
    out["server"] = server
    return out, files


if __name__ == "__main__":
    from steps.plan import find
    from steps.store import execute
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    execute(find(f"eval:{sys.argv[1]}"))
