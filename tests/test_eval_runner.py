"""The eval's runner against a stand-in OpenAI-compatible server on loopback that answers as llama-server does for a
thinking model: ``reasoning_content`` apart (or inline ``<think>`` blocks), ``finish_reason: length`` when the
cap cuts the reply, reasoning deltas before content deltas when streamed, ``/tokenize`` and ``/props``.

What must hold: thinking never eats a test's answer cap; a reply the cap cuts is "truncated", never "fail"; the
recipe's thinking setting reaches the chat template; samples are seeded draws with an interval; without a sandbox,
generated code is not run and the tests say so."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from steps.evalsuite import all_tests


@dataclass
class Thinker:
    """How the stand-in model answers: ``thinks`` words of reasoning (unless the request turns thinking off),
    then ``answer``; ``inline``: the reasoning stays in content as a <think> block (llama-server with
    --reasoning-format none); ``unparsed``: as inline, but the chat template opened the block (its /apply-template
    prompt ends in ``<think>``, as Qwen3's does), so the content starts in the thinking without the opening tag.
    One word is one token (its /tokenize splits on spaces). ``most_at_once``: the most requests it answered at once
    (each takes ``seconds``)."""
    thinks: int = 300
    answer: str = "pong"
    inline: bool = False
    unparsed: bool = False
    seconds: float = 0.0
    delays: list[float] = field(default_factory=list)    # per request, before ``seconds``
    requests: list[dict[str, Any]] = field(default_factory=list)
    at_once: int = 0
    most_at_once: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def render(self, body: dict[str, Any]) -> str:
        """/apply-template's prompt: a Qwen3-style template, open think block unless thinking is off."""
        enabled = (body.get("chat_template_kwargs") or {}).get("enable_thinking", True)
        user = body["messages"][-1]["content"]
        return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n" + (
            "<think>\n" if enabled else "<think>\n\n</think>\n\n")

    def reply(self, body: dict[str, Any]) -> tuple[str, str, str]:
        """(reasoning, content, finish_reason) for one request, cut at its max_tokens."""
        with self.lock:
            self.requests.append(body)
            self.at_once += 1
            self.most_at_once = max(self.most_at_once, self.at_once)
        with self.lock:
            delay = self.delays.pop(0) if self.delays else self.seconds
        time.sleep(delay)
        with self.lock:
            self.at_once -= 1
        enabled = (body.get("chat_template_kwargs") or {}).get("enable_thinking", True)
        thought = [f"step{i}" for i in range(self.thinks if enabled else 0)]
        answer = self.answer.split(" ")
        cap = int(body.get("max_tokens") or 10_000)
        finish = "length" if len(thought) + len(answer) > cap else "stop"
        thought, answer = thought[:cap], answer[:max(0, cap - len(thought))]
        reasoning = " ".join(thought)
        content = " ".join(answer)
        if (self.inline or self.unparsed) and thought:
            opening = "" if self.unparsed else "<think>"
            content = f"{opening}{reasoning}" + (" </think> " if len(thought) == self.thinks else "") + content
            reasoning = ""
        return reasoning, content, finish


def _handler(model: Thinker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, payload: Any, content_type: str = "application/json") -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/props":
                self._send({"chat_template": "{% if enable_thinking %}<think>\n{% endif %}{{ messages }}"})
            else:
                self._send({"status": "ok"})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":
                self._send({"tokens": list(range(len(body["content"].split())))})
                return
            if self.path == "/apply-template":
                self._send({"prompt": model.render(body)})
                return
            reasoning, content, finish = model.reply(body)
            tokens = len(reasoning.split()) + len(content.split())
            usage = {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": 10 + tokens}
            if not body.get("stream"):
                message = {"role": "assistant", "content": content}
                if reasoning:
                    message["reasoning_content"] = reasoning
                self._send({"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                            "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage})
                return
            events = [{"reasoning_content": w + " "} for w in reasoning.split()]
            events += [{"content": w + " "} for w in content.split()]
            chunks = [{"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in events]
            chunks.append({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
            chunks.append({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                           "choices": [], "usage": usage})
            self._send(b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n",
                       "text/event-stream")
    return Handler


@pytest.fixture
def stand_in() -> Iterator[tuple[str, Thinker]]:
    model = Thinker()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(model))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", model
    finally:
        server.shutdown()
        server.server_close()


def params(**given: Any) -> dict[str, Any]:
    """A recipe's eval block as the recipe reader fills it."""
    from steps.recipe.eval import EVAL
    out = {k: f.default for k, f in EVAL.items()}
    out.update({"server": {"parallel": 1}, "variant": "m", "categories": None, "tests": None, "ggufs": None}, **given)
    return out


def run(url: str, ids: list[str], **given: Any) -> dict[str, dict[str, Any]]:
    from steps.eval import _Runner, run_suite
    runner = _Runner(url, params(**given))
    return {r["id"]: r for r in run_suite(runner, all_tests(ids=ids))}


def test_thinking_gets_its_budget_on_top_of_the_answer_cap(stand_in: tuple[str, Thinker]) -> None:
    """300 tokens of thinking, then "pong": ping's own 16-token cap would cut it in its thinking; with the thinking
    budget on top, it passes, and eval.json says how much it thought."""
    url, model = stand_in
    ping = run(url, ["ping"], thinking="on")["ping"]
    assert ping["status"] == "pass", ping["reason"]
    assert model.requests[-1]["max_tokens"] == 16 + 2048
    assert model.requests[-1]["chat_template_kwargs"] == {"enable_thinking": True}
    assert model.requests[-1]["thinking_budget_tokens"] == 2048
    assert ping["thinking_tokens"] == 300 and ping["answer_tokens"] == 1 and ping["finish_reason"] == "stop"
    assert ping["reasoning"].startswith("step0 step1") and ping["reasoning_chars"] > 1000


def test_a_reply_cut_in_its_thinking_is_truncated_not_failed(stand_in: tuple[str, Thinker]) -> None:
    url, model = stand_in
    for inline in (False, True):
        model.inline = inline
        ping = run(url, ["ping"], thinking=100)["ping"]
        assert model.requests[-1]["max_tokens"] == 16 + 100
        assert ping["status"] == "truncated" and ping["cut"] == "thinking", ping
        assert "in its thinking" in ping["reason"] and ping["finish_reason"] == "length"
        assert ping["rate"] is None and ping["draws"] == ["truncated"]


def test_thinking_the_server_left_in_an_opened_block_is_read_as_thinking(stand_in: tuple[str, Thinker]) -> None:
    """The template opened the think block and the server did not parse it: the content is thinking up to
    ``</think>``; cut before the tag, the whole reply is thinking (truncated in its thinking, not a wrong answer)."""
    url, model = stand_in
    model.unparsed = True
    ping = run(url, ["ping"], thinking="on")["ping"]
    assert ping["status"] == "pass" and ping["thinking_tokens"] == 300, ping
    assert ping["answer_tokens"] == 2                    # "</think>" and "pong"
    cut = run(url, ["ping"], thinking=100)["ping"]
    assert cut["status"] == "truncated" and cut["cut"] == "thinking", cut
    assert cut["thinking_tokens"] == 116 and cut["answer_tokens"] == 0
    model.unparsed, model.inline = False, False
    plain = run(url, ["ping"], thinking="off")["ping"]             # the prompt closed the block: an answer
    assert plain["status"] == "pass" and plain["thinking_tokens"] == 0


def test_repeatable_sends_one_request_at_a_time(stand_in: tuple[str, Thinker]) -> None:
    """repeatable (the default): requests never share the server's batch, whatever eval.server.parallel says;
    ``repeatable: false`` fills the parallel slots."""
    url, model = stand_in
    model.thinks, model.seconds = 0, 0.2
    ids = ["ping", "factual_qa", "instruction_following", "system_prompt"]
    run(url, ids, thinking="off", server={"parallel": 4})
    assert model.most_at_once == 1 and len(model.requests) >= 4
    run(url, ids, thinking="off", server={"parallel": 4}, repeatable=False)
    assert model.most_at_once > 1


def test_a_timed_test_cut_by_its_cap_is_graded_on_its_timings(stand_in: tuple[str, Thinker]) -> None:
    """throughput_consistency reads only the timings: its replies run to the cap by design, and a rate that varies
    is a failure, not a truncation."""
    url, model = stand_in
    model.thinks, model.answer = 0, " ".join(["word"] * 300)
    model.delays = [0.1, 0.4, 0.1]
    varied = run(url, ["throughput_consistency"], thinking="off")["throughput_consistency"]
    assert varied["finish_reason"] == "length" and varied["status"] == "fail", varied
    assert "varies more than" in varied["reason"]
    model.seconds = 0.2
    steady = run(url, ["throughput_consistency"], thinking="off")["throughput_consistency"]
    assert steady["status"] == "pass", steady


def test_a_reply_cut_in_its_answer_is_truncated_and_a_wrong_whole_answer_fails(stand_in: tuple[str, Thinker]) -> None:
    url, model = stand_in
    model.thinks, model.answer = 0, " ".join(["word"] * 40)
    cut = run(url, ["ping"], thinking="off")["ping"]
    assert cut["status"] == "truncated" and cut["cut"] == "answer", cut
    model.answer = "ping"
    wrong = run(url, ["ping"], thinking="off")["ping"]
    assert wrong["status"] == "fail" and "expected exactly 'pong'" in wrong["reason"]


def test_thinking_off_reaches_the_template_and_auto_reads_it(stand_in: tuple[str, Thinker]) -> None:
    """off: enable_thinking false and no budget (the stand-in then answers at once); auto: the template decides,
    and a template that opens a think block gets the budget."""
    url, model = stand_in
    off = run(url, ["ping"], thinking="off")["ping"]
    assert off["status"] == "pass" and off["thinking_tokens"] == 0
    assert model.requests[-1]["chat_template_kwargs"] == {"enable_thinking": False}
    assert model.requests[-1]["max_tokens"] == 16 and "thinking_budget_tokens" not in model.requests[-1]
    auto = run(url, ["ping"])["ping"]
    assert auto["status"] == "pass" and "chat_template_kwargs" not in model.requests[-1]
    assert model.requests[-1]["max_tokens"] == 16 + 2048
    assert all(r["cache_prompt"] is False for r in model.requests)       # no KV reused across requests


def test_a_recipe_raises_a_cap_as_well_as_lowers_it(stand_in: tuple[str, Thinker]) -> None:
    url, model = stand_in
    model.thinks = 0
    run(url, ["ping", "factual_qa"], max_tokens={"ping": 200, "basic": 8}, thinking="off")
    caps = sorted(r["max_tokens"] for r in model.requests)
    assert caps == [8, 200]
    run(url, ["ping"], max_tokens=1000, thinking="off")
    assert model.requests[-1]["max_tokens"] == 1000


def test_streamed_reasoning_then_content_counts_as_streamed(stand_in: tuple[str, Thinker]) -> None:
    url, model = stand_in
    model.answer = " ".join(str(i) for i in range(1, 21))
    streamed = run(url, ["sse_streaming"], thinking="on")["sse_streaming"]
    assert streamed["status"] == "pass", streamed["reason"]
    assert streamed["thinking_tokens"] == 300
    cut = run(url, ["sse_streaming"], thinking=50)["sse_streaming"]
    assert cut["status"] == "truncated" and cut["cut"] == "thinking", cut


def test_samples_are_seeded_draws_with_an_interval(stand_in: tuple[str, Thinker]) -> None:
    url, model = stand_in
    ping = run(url, ["ping"], samples=5, temperature=0.7, seed=10, thinking="on")["ping"]
    assert [r["seed"] for r in model.requests] == [10, 11, 12, 13, 14]
    assert ping["draws"] == ["pass"] * 5 and ping["rate"] == 1.0
    assert ping["interval"][0] == pytest.approx(0.5655, abs=1e-4) and ping["interval"][1] == 1.0


def test_without_a_sandbox_generated_code_is_not_run(stand_in: tuple[str, Thinker],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from steps import sandbox
    url, model = stand_in
    model.thinks, model.answer = 0, "```python\ndef climb_stairs(n):\n    return n\n```"
    monkeypatch.setattr(sandbox, "sandbox_mode", lambda: "none")
    result = run(url, ["climbing_stairs"])["climbing_stairs"]
    assert result["status"] == "not run", result
    assert "apt-get install bubblewrap" in result["reason"] and "MERGEFORGE_SANDBOX=rlimits" in result["reason"]
