"""eval: the capability suite (steps/evalsuite, 44 tests in 9 categories) against llama-server, one GGUF at a time.

``eval:<variant>-<NAME>`` serves one GGUF with llama-server (steps.server: a free loopback port, always stopped),
talks to it through the ``openai`` client, grades every test and writes ``<variant>-<NAME>.eval.json`` (schema 3:
each test's status -- pass, fail, truncated, error, not run -- reason, finish reason, thinking and answer tokens,
draws, rate and interval; totals per category; how the scores were obtained), ``<variant>-<NAME>.timings.json``
(latency and tokens/s, measurements kept apart) and the server's log beside them. The key holds the GGUF's digest,
the recipe's eval block, the suite's own code (eval_code_digest: a changed prompt or grader reruns the evals and
nothing else) and the sandbox mode; sampling is greedy and seeded by default, and no request reuses another's
prompt cache. Generated code runs in steps.sandbox, or not at all.

Tests run concurrently (``eval.server.parallel`` of them), the timed ones (performance) alone afterwards; with
``eval.repeatable`` (the default) their requests reach the server one at a time, so that no reply depends on what
shares its batch. docs/evals.md says what a score means.

    python -m steps.eval demo-Q4_K_M             # run one eval stage of recipes/demo.yaml
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps import constants as C
from steps.errors import StepFailed
from steps.stage import Declaration

if TYPE_CHECKING:
    from steps.evalsuite import Reply, Test
    from steps.stage import Context, Stage

logger = logging.getLogger(__name__)
CODE_CATEGORIES = ("programming", "agentic", "frontend")     # the categories whose tests run generated code

def build(ctx: Context) -> None:
    from steps import sandbox, server
    from steps.evalsuite import all_tests
    from steps.evalsuite.frontend import browser_version
    stage = ctx.stage
    params = stage.params
    dep = next(d for d in stage.deps if d.split(":", 1)[0] in ("quantize", "convert"))
    rel = ctx.upstream_file(dep.split(":", 1)[0])
    gguf = stage.build_dir / rel
    made = ctx.upstream(dep.split(":", 1)[0])["outputs"].get(rel, {})
    tests = all_tests(params["categories"], params["tests"])
    for noisy in ("httpx", "httpx2", "openai"):  # one INFO line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    options = {**params["server"]}
    if options.get("chat_template"):
        options["chat_template"] = stage.files["chat_template"]
    log = ctx.out / C.EVAL_LOG.format(name=stage.name)
    remote = options.get("url")
    key = server.api_key(options)
    where = server.running(remote, log, key) if remote else server.serve(gguf, options, log,
                                                                         timeout_s=params["timeout_s"])
    started = time.monotonic()
    with sandbox.choose(params["sandbox"]) as mode, where as url:
        runner = _Runner(url, params, key)
        results = run_suite(runner, tests)
    wall = time.monotonic() - started
    keep_artifacts(results, ctx.out, stage.name)
    timings = {"schema": 1, "name": stage.name, "wall_s": round(wall, 2),
               "tests": {r["id"]: r.pop("timing") for r in results}}
    tokens = sum(t["completion_tokens"] for t in timings["tests"].values())
    seconds = sum(t["generation_s"] for t in timings["tests"].values())
    timings["completion_tokens"], timings["tokens_per_s"] = tokens, round(tokens / seconds, 2) if seconds else 0.0
    report = summarize(results, params)
    report = {"schema": 3, "gguf": gguf.name, "variant": params["variant"], "name": stage.name,
              "digest": made.get("digest"), "size": made.get("size"), "tool_calls": params["tool_calls"],
              "thinking": runner.thinking_used(),
              "sandbox": mode if any(r["category"] in CODE_CATEGORIES for r in results) else None,
              "browser": browser_version() if any(r["category"] == "frontend" for r in results) else None,
              "server": ({"url": remote, "started": False, "identity": server.identity(remote, key)} if remote
                         else {"started": True, "program": "llama-server"}),
              **report, "settings": {k: v for k, v in params.items() if k != "variant"}, "tests": results}
    (ctx.out / C.EVAL_FILE.format(name=stage.name)).write_text(json.dumps(report, indent=1) + "\n")
    (ctx.out / C.EVAL_TIMINGS.format(name=stage.name)).write_text(json.dumps(timings, indent=1) + "\n")
    ctx.record["eval"] = {**{k: report[k] for k in ("passed", "total", "rate", "interval", "statuses")},
                          "tokens_per_s": timings["tokens_per_s"], "wall_s": timings["wall_s"]}
    logger.info("eval %s: %d/%d passed (%s) in %.0f s", stage.name, report["passed"], report["total"],
                ", ".join(f"{n} {s}" for s, n in report["statuses"].items()), wall)


def summarize(results: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    """The totals of an eval's results: overall and per category, tests passed of tests, draws per status, the pass
    rate over verdicts with its interval (steps.evalsuite.scores), and the tests passed when only the API's
    tool_calls count ("api") and when calls written in the text count too ("text")."""
    from steps.evalsuite import CATEGORIES
    from steps.evalsuite.scores import tally

    def totals(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"passed": sum(r["status"] == "pass" for r in rs), "total": len(rs),
                **tally(s for r in rs for s in r["draws"]),
                "api": sum(r["passes_api"] for r in rs), "text": sum(r["passes_text"] for r in rs)}
    categories = {c: totals([r for r in results if r["category"] == c])
                  for c in CATEGORIES if any(r["category"] == c for r in results)}
    return {**totals(results), "samples": params["samples"], "categories": categories}


def graded_both(test: Test, reply: Reply) -> dict[str, Any]:
    """The test's grade when calls written in the reply's text count ("text") and when only the API's tool_calls do
    ("api"). A reply whose calls all came from the API is graded once: both are that grade."""
    text = test.grade(reply)
    return {"text": text, "api": test.grade(reply.api_only()) if reply.wrote_calls() else text}


def run_suite(runner: _Runner, tests: list[Test]) -> list[dict[str, Any]]:
    """Every test through ``runner``, as many at once as the server has slots (the timed ones alone afterwards);
    one result per test, in the order of ``tests``."""
    parallel = max(1, int(runner.params["server"].get("parallel", 1)))
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


def answer_cap(test: Test, caps: int | dict[str, int] | None) -> int:
    """The test's answer cap: the recipe's eval.max_tokens (one number, or by test id, then category), else the
    test's own."""
    if isinstance(caps, int):
        return caps
    caps = caps or {}
    return caps.get(test.id, caps.get(test.category, test.max_tokens))


REASONING_KEPT = 2000        # characters of a reply's reasoning kept in eval.json


class _Runner:
    """Sends a test's requests (openai client), grades its reply, and never lets one test stop the others.

    Thinking (``eval.thinking``): ``off`` sends ``chat_template_kwargs: {enable_thinking: false}``; ``on`` or a
    budget sends ``enable_thinking: true``; ``auto`` sends neither and lets the chat template decide. When the model
    may think (on, a budget, or auto on a model that thinks by default) each request asks llama-server for that
    thinking budget (``thinking_budget_tokens``: the server closes the block when it is spent) and its
    ``max_tokens`` is the test's answer cap plus the budget, so thinking never eats the answer's tokens; a reply the
    cap cuts anyway is "truncated", not failed."""

    def __init__(self, url: str, params: dict[str, Any], key: str = "mergeforge-local") -> None:
        import openai

        from steps.evalsuite import Options
        self.url, self.key = url, key
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, timeout=params["timeout_s"], max_retries=0)
        self.params, self.options = params, Options(needle_tokens=params["needle_tokens"])
        self.model = params["server"].get("alias") or "model"
        if params["server"].get("url") and not params["server"].get("alias"):
            from steps import server
            served = server.identity(url, key)["models"]        # vLLM and SGLang want the served model's id
            self.model = served[0] if len(served) == 1 else self.model
        self.budget = 0                  # the prompt is rendered with the thinking switch alone
        prompt = self._render_prompt()
        self.opened = prompt is not None and _opens_thinking(prompt)
        self.template_thinks = _template_thinks(url, prompt) if params["thinking"] == "auto" else None
        self.budget = self._budget()
        # repeatable: one request on the server at a time. Requests that share a batch on parallel slots differ in
        # the last bits of their arithmetic (the batch's size picks the kernels), which can flip a greedy reply;
        # grading, sandboxed code and the browser still run concurrently.
        self.one_at_a_time = threading.Lock() if params["repeatable"] else contextlib.nullcontext()

    def _budget(self) -> int:
        from steps.recipe.eval import THINKING_BUDGET
        thinking = self.params["thinking"]
        if isinstance(thinking, int):
            return thinking
        if thinking == "on" or thinking == "auto" and self.template_thinks:
            return THINKING_BUDGET
        return 0

    def extra_body(self) -> dict[str, Any]:
        """What each request adds to the OpenAI body for llama-server: no prompt-cache reuse, the thinking switch
        (unless auto) and the thinking budget."""
        extra: dict[str, Any] = {"cache_prompt": False}      # no reuse of another request's KV: see docs/evals.md
        if self.params["thinking"] != "auto":
            extra["chat_template_kwargs"] = {"enable_thinking": self.params["thinking"] != "off"}
        if self.budget:                  # llama-server closes the think block after this many tokens
            extra["thinking_budget_tokens"] = self.budget
        return extra

    def _render_prompt(self) -> str | None:
        """The prompt the server renders for one user message with this eval's thinking switch (llama-server's
        /apply-template; None from a server without it). llama-server turns thinking on only for templates whose
        format it knows, so the rendered prompt, not the template's source, says whether the model thinks."""
        import urllib.error
        try:
            answer = self._post("/apply-template", {"messages": [{"role": "user", "content": "Hello"}],
                                                    **self.extra_body()})
        except (urllib.error.URLError, OSError, ValueError):
            return None
        return str(answer.get("prompt") or "")

    def _post(self, path: str, payload: dict[str, Any]) -> Any:
        """llama-server's JSON answer to a POST of ``payload`` to ``path`` (its endpoints beside the OpenAI API)."""
        import urllib.request
        request = urllib.request.Request(f"{self.url}{path}", json.dumps(payload).encode(),
                                         {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"})
        with urllib.request.urlopen(request, timeout=self.params["timeout_s"]) as resp:
            return json.loads(resp.read())

    def thinking_used(self) -> dict[str, Any]:
        """What eval.json says of thinking: the setting, whether the template thinks (auto), the budget given,
        whether the prompt ends inside an open think block."""
        return {"setting": self.params["thinking"], "template_thinks": self.template_thinks, "budget": self.budget,
                "prompt_opens": self.opened}

    def ask(self, request: dict[str, Any], cap: int, seed: int) -> Reply:
        from steps.evalsuite import Reply, Timing
        p = self.params
        kwargs = {**request, "model": self.model, "temperature": p["temperature"], "seed": seed,
                  "max_tokens": cap + self.budget, "extra_body": self.extra_body()}
        with self.one_at_a_time:
            started = time.monotonic()
            if kwargs.get("stream"):
                chunks = list(self.client.chat.completions.create(**kwargs))
                seconds = time.monotonic() - started
                usage = next((c.usage for c in reversed(chunks) if getattr(c, "usage", None)), None)
                n = int(usage.completion_tokens) if usage else 0
                return Reply.from_stream(chunks, Timing(seconds, n, n / seconds if seconds else 0.0),
                                         opened=self.opened)
            completion = self.client.chat.completions.create(**kwargs)
            seconds = time.monotonic() - started
        n = int(completion.usage.completion_tokens) if completion.usage else 0
        return Reply.from_completion(completion, Timing(seconds, n, n / seconds if seconds else 0.0),
                                     opened=self.opened)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` in the served model's vocabulary (llama-server's /tokenize)."""
        if not text:
            return 0
        return len(self._post("/tokenize", {"content": text, "add_special": False})["tokens"])

    def draw(self, test: Test, seed: int) -> dict[str, Any]:
        """One draw of a test: its status (steps.evalsuite.scores), reason, and what the reply spent."""
        from steps.evalsuite import conduct
        from steps.sandbox import SandboxUnavailable
        cap = answer_cap(test, self.params["max_tokens"])
        started = time.monotonic()
        out: dict[str, Any] = {"api": False, "text": False, "source": None, "finish_reason": None, "cut": None,
                               "reasoning": "", "thinking_tokens": 0, "answer_tokens": 0, "artifacts": {},
                               "timings": []}
        try:
            reply = conduct(test, lambda request: self.ask(request, cap, seed), self.options)
            replies = [r for turn in reply.turns or (reply,) for r in turn.runs or (turn,)]
            out["timings"] = [r.timing for r in replies if r.timing is not None]
            out["finish_reason"] = (reply.turns[-1] if reply.turns else reply).finish_reason
            out["cut"] = reply.cut()
            out["reasoning"] = "\n\n".join(r.thinking for r in replies if r.thinking)
            completion = sum(t.completion_tokens for t in out["timings"])
            out["thinking_tokens"] = sum(self.count_tokens(r.thinking) for r in replies)
            out["answer_tokens"] = max(0, completion - out["thinking_tokens"])
            graded = graded_both(test, reply)
            grade = graded[self.params["tool_calls"]]
            out["api"], out["text"] = graded["api"].passed, graded["text"].passed
            out["artifacts"] = dict(grade.artifacts)
            out["source"] = ("text" if reply.wrote_calls() else
                             "tool_calls" if any(c.source == "tool_calls" for c in reply.all_calls()) else None)
            if grade.passed:
                out["status"], out["reason"] = "pass", grade.reason
            elif out["cut"] and not test.times_only:
                where = "its thinking" if out["cut"] == "thinking" else "its answer"
                out["status"] = "truncated"
                out["reason"] = (f"cut by the cap ({cap} answer + {self.budget} thinking tokens) in {where}; "
                                 f"raise eval.max_tokens or the thinking budget (graded as cut: {grade.reason})")
            else:
                out["status"], out["reason"] = "fail", grade.reason
        except SandboxUnavailable as exc:
            out["status"], out["reason"] = "not run", f"not run: {exc}"[:500]
        except Exception as exc:  # noqa: BLE001 - a server error or a grader crash is one test's error
            out["status"], out["reason"] = "error", f"{type(exc).__name__}: {exc}"[:500]
        out["latency_s"] = round(time.monotonic() - started, 3)
        return out

    def run(self, test: Test) -> dict[str, Any]:
        """Every draw of a test (``eval.samples``, seeds seed, seed+1, ...), summed up: the first draw's details,
        the status of the draws, their rate and interval."""
        from steps.evalsuite.scores import tally, verdict_of
        draws = [self.draw(test, self.params["seed"] + i) for i in range(self.params["samples"])]
        first = draws[0]
        statuses = [d["status"] for d in draws]
        status = verdict_of(statuses)
        shown = next((d for d in draws if d["status"] == status), first)
        timings = [t for d in draws for t in d["timings"]]
        result = {"id": test.id, "category": test.category, "status": status, "reason": shown["reason"],
                  "finish_reason": shown["finish_reason"], "cut": shown["cut"],
                  "answer_cap": answer_cap(test, self.params["max_tokens"]),
                  "thinking_tokens": shown["thinking_tokens"], "answer_tokens": shown["answer_tokens"],
                  "reasoning_chars": len(shown["reasoning"]), "reasoning": shown["reasoning"][:REASONING_KEPT],
                  "passes_api": all(d["api"] for d in draws), "passes_text": all(d["text"] for d in draws),
                  "tool_call_source": next((d["source"] for d in draws if d["source"]), None),
                  "draws": statuses, **{k: v for k, v in tally(statuses).items() if k != "statuses"},
                  "artifacts": next((d["artifacts"] for d in draws if d["artifacts"]), {}),
                  "timing": {"latency_s": round(sum(d["latency_s"] for d in draws) / len(draws), 3),
                             "completion_tokens": sum(t.completion_tokens for t in timings),
                             "generation_s": round(sum(t.seconds for t in timings), 3)}}
        if len(draws) > 1:
            result["draw_reasons"] = [d["reason"] for d in draws]
        return result


def _opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open ``<think>`` block (as Qwen3's and DeepSeek-R1's do): the reply
    then starts in its thinking, without the opening tag."""
    tail = prompt.rstrip()
    return tail.rfind("<think>") > tail.rfind("</think>")


def _template_thinks(url: str, prompt: str | None) -> bool:
    """Whether the served model thinks by default: its rendered prompt opens a ``<think>`` block, or its chat
    template (llama-server's /props) writes ``<think>`` or reads enable_thinking and the rendered prompt does not end
    in a closed, empty block (the template's own "thinking off")."""
    import urllib.request
    if prompt is not None and _opens_thinking(prompt):
        return True
    if prompt is not None and prompt.rstrip().endswith("</think>"):
        return False
    with urllib.request.urlopen(f"{url}/props", timeout=30) as resp:
        template = str(json.loads(resp.read()).get("chat_template") or "")
    return "<think>" in template or "enable_thinking" in template


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
    """The suite's code, the sandbox mode generated code runs in (or none: not run), and the browser's version when
    frontend tests run: the results depend on each."""
    from steps import sandbox
    found = {"suite": eval_code_digest()}
    with sandbox.choose(stage.params["sandbox"]) as mode:
        found["sandbox"] = mode
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




def key_inputs(stage: Stage, cache: Any) -> dict[str, Any]:
    """An eval against a server started elsewhere (eval.server.url): what that server says it serves enters the
    key, so results from one model are never served as another's."""
    options = stage.params["server"]
    if not options.get("url"):
        return {}
    from steps import server
    return {"server": server.identity(options["url"], server.api_key(options))}


def gguf_identity(path: Path) -> dict[str, int]:
    """What llama-server reports of a model, computed from the GGUF: its parameter count and tensor bytes."""
    from gguf import GGUFReader
    reader = GGUFReader(path)
    return {"n_params": int(sum(int(t.n_elements) for t in reader.tensors)),
            "size": int(sum(int(t.n_bytes) for t in reader.tensors))}


def check_server(stage: Stage, inputs: dict[str, dict[str, Any]]) -> None:
    """Before an eval against a server started elsewhere: refuse, by name, a server that serves another model than
    the GGUF the stage declares (its file name, parameter count or size differ); a server that reports none of
    them (vLLM, SGLang) is taken at the recipe's word, and eval.json says what it reported."""
    options = stage.params["server"]
    if not options.get("url"):
        return
    from steps import server
    found = server.identity(options["url"], server.api_key(options))
    dep = next(d for d in stage.deps if d.split(":", 1)[0] in ("quantize", "convert"))
    manifest = inputs[dep]
    rel = str(manifest.get("main") or next(r for r in manifest["outputs"] if r.endswith(".gguf")))
    gguf = stage.build_dir / rel
    expected = gguf_identity(gguf)
    wrong = [f"{k} {found[k]} where {gguf.name} has {expected[k]}" for k in ("n_params", "size")
             if k in found and found[k] != expected[k]]
    if "model_file" in found and found["model_file"] != gguf.name and (wrong or not set(found) & set(expected)):
        wrong.insert(0, f"its model file is {found['model_file']}")
    if wrong:
        raise StepFailed(f"{stage.id}: the server at {options['url']} serves another model than {gguf.name}: "
                         f"{'; '.join(wrong)}; point eval.server.url at a server running {gguf.name} (llama-server "
                         f"-m build/{stage.recipe.name}/{gguf.name}), or drop url to let the stage start one")
    if not set(found) & {"model_file", "n_params", "size"}:
        logger.warning("%s: the server at %s reports only its model ids %s: it is taken to serve %s, as the recipe "
                       "says (eval.json records what it reported)", stage.id, options["url"], found["models"],
                       gguf.name)


STAGE = Declaration(build=build, tools=tools, key_inputs=key_inputs, check=check_server)

if __name__ == "__main__":
    from steps.plan import find
    from steps.store import execute
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    execute(find(f"eval:{sys.argv[1]}"))
