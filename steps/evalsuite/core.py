"""The suite's types: a Test (request + grader), the Reply it is graded on, the Grade, and the registry.

A runner turns a Test into chat requests with ``Test.request`` (or plays it with ``conduct``), turns each OpenAI chat
completion into a ``Reply`` (``Reply.from_completion`` / ``Reply.from_stream``), and calls ``test.grade(reply)``.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from steps.evalsuite.text import clip, strip_thinking, text_tool_calls

Message = dict[str, Any]
_THINK_BLOCK = re.compile(r"<think>(.*?)(?:</think>|\Z)", re.S)


@dataclass(frozen=True)
class Grade:
    passed: bool
    reason: str
    artifacts: Mapping[str, bytes] = field(default_factory=dict)   # files the eval keeps (a page, its screenshot)


def ok(reason: str) -> Grade:
    return Grade(True, reason)


def fail(reason: str) -> Grade:
    return Grade(False, reason)


@dataclass(frozen=True)
class ToolCall:
    """One function call: from the API's ``tool_calls`` (source "tool_calls") or parsed out of the text ("text")."""
    name: str
    arguments: str  # raw, as the model wrote it: JSON that may be malformed
    id: str = ""
    source: str = "tool_calls"

    def args(self) -> dict[str, Any]:
        """The arguments as a JSON object; ValueError with the reason when they are not one."""
        try:
            value = json.loads(self.arguments) if self.arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"arguments of {self.name!r} are not valid JSON ({e.msg} at char {e.pos}): "
                             f"{clip(self.arguments)}") from None
        if not isinstance(value, dict):
            raise ValueError(f"arguments of {self.name!r} are not a JSON object: {clip(self.arguments)}")
        return value


@dataclass(frozen=True)
class Timing:
    """Measured by the runner for one request."""
    seconds: float
    completion_tokens: int
    tokens_per_s: float


@dataclass(frozen=True)
class Reply:
    """One assistant reply. ``runs``: every reply of a repeated request (this one first); ``turns``: every assistant
    reply of a multi-turn script, in order (this one last); ``chunks``: SSE chunks that carried answer text or a
    call; ``reasoning``: the thinking the server returned apart (llama-server's ``reasoning_content``), while
    thinking the server left inline stays in ``content`` as a ``<think>`` block; ``opened``: the prompt opened the
    block (a Qwen3-style template), so content the server did not parse starts inside it, without the opening tag."""
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str | None = None
    timing: Timing | None = None
    chunks: int = 0
    runs: tuple[Reply, ...] = ()
    turns: tuple[Reply, ...] = ()
    text_calls: bool = True      # calls written in the text count (False: only the API's tool_calls do)
    reasoning: str = ""
    opened: bool = False

    @classmethod
    def from_completion(cls, completion: Any, timing: Timing | None = None, opened: bool = False) -> Reply:
        """From an ``openai`` ChatCompletion (first choice)."""
        choice = completion.choices[0]
        calls = tuple(ToolCall(c.function.name, c.function.arguments or "", c.id or "")
                      for c in choice.message.tool_calls or ())
        reasoning = getattr(choice.message, "reasoning_content", None) or ""
        return cls(choice.message.content or "", calls, choice.finish_reason, timing, reasoning=reasoning,
                   opened=opened)

    @classmethod
    def from_stream(cls, chunks: Iterable[Any], timing: Timing | None = None, opened: bool = False) -> Reply:
        """From the ChatCompletionChunks of a streamed request: content and tool-call deltas joined."""
        content: list[str] = []
        reasoning: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        finish, count = None, 0
        for chunk in chunks:
            if not chunk.choices:  # the usage chunk
                continue
            choice = chunk.choices[0]
            delta = choice.delta
            finish = choice.finish_reason or finish
            if delta.content or delta.tool_calls:
                count += 1
            content.append(delta.content or "")
            reasoning.append(getattr(delta, "reasoning_content", None) or "")
            for part in delta.tool_calls or ():
                call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = part.id or call["id"]
                if part.function is not None:
                    call["name"] += part.function.name or ""
                    call["arguments"] += part.function.arguments or ""
        tool_calls = tuple(ToolCall(c["name"], c["arguments"], c["id"]) for _, c in sorted(calls.items()))
        return cls("".join(content), tool_calls, finish, timing, count, reasoning="".join(reasoning), opened=opened)

    def _still_thinking(self) -> bool:
        """Whether all of the content is thinking: the prompt opened the block, the server returned no reasoning
        apart and no closing tag came before the cap cut the reply."""
        return (self.opened and self.finish_reason == "length" and not self.reasoning and not self.tool_calls
                and "</think>" not in self.content and "<think>" not in self.content)

    @property
    def text(self) -> str:
        """The answer: the content without inline reasoning (``<think>...</think>``), stripped."""
        return "" if self._still_thinking() else strip_thinking(self.content)

    @property
    def thinking(self) -> str:
        """The reply's reasoning: what the server returned apart, and any inline ``<think>`` block (the whole
        content when the prompt opened the block and the cap came before it closed)."""
        inline = _THINK_BLOCK.findall(self.content)
        if "</think>" in self.content and "<think>" not in self.content:   # the template opened the block
            inline = [self.content.split("</think>", 1)[0]]
        elif self._still_thinking():
            inline = [self.content]
        return "\n".join(part for part in (self.reasoning, *inline) if part.strip()).strip()

    def cut(self) -> str | None:
        """Where the token cap cut this reply (any run or turn of it): "thinking" when it stopped inside its
        reasoning, before any answer; "answer" when it stopped in the answer; None when the model stopped."""
        for reply in (*(self.turns or (self,)), *self.runs):
            if reply.finish_reason == "length":
                open_inline = reply.content.count("<think>") > reply.content.count("</think>")
                return "thinking" if open_inline or (reply.thinking and not reply.text and not reply.tool_calls) \
                    else "answer"
        return None

    def calls(self) -> list[ToolCall]:
        """The API's tool calls, or else (unless ``text_calls`` is off) the calls written in the text
        (``<tool_call>`` JSON or XML, a bare JSON call, ``[TOOL_CALLS]``)."""
        if self.tool_calls:
            return list(self.tool_calls)
        if not self.text_calls:
            return []
        return [ToolCall(name, arguments, source="text") for name, arguments in text_tool_calls(self.text)]

    def api_only(self) -> Reply:
        """This reply (its runs and turns too) as graded when only the API's tool_calls count: a call the model
        wrote in its text, which a working chat template and tool parser would have returned as a tool call, is
        no call."""
        return replace(self, text_calls=False, runs=tuple(r.api_only() for r in self.runs),
                       turns=tuple(t.api_only() for t in self.turns))

    def wrote_calls(self) -> bool:
        """Whether any turn's calls were read from its text (the API gave none)."""
        return any(c.source == "text" for turn in self.turns or (self,) for r in turn.runs or (turn,)
                   for c in r.calls())

    def all_calls(self) -> list[ToolCall]:
        """The calls of every turn of a script (of this reply alone otherwise)."""
        return [c for turn in self.turns or (self,) for c in turn.calls()]

    @property
    def timings(self) -> list[Timing]:
        return [r.timing for r in self.runs or (self,) if r.timing is not None]

    def assistant_message(self) -> Message:
        """This reply as the assistant message of a continued conversation."""
        message: Message = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in self.tool_calls]
        return message


@dataclass(frozen=True)
class Options:
    """Recipe options that change prompts (the runner keys its evals on them too)."""
    needle_tokens: int = 4096  # size of the needle-in-a-haystack document, in (estimated) tokens

    def __post_init__(self) -> None:
        if not isinstance(self.needle_tokens, int) or not 100 <= self.needle_tokens <= 1_000_000:
            raise ValueError(f"needle_tokens must be an integer from 100 to 1000000, not {self.needle_tokens!r}")


ToolFake = Callable[[dict[str, Any]], str]


@dataclass(frozen=True)
class Script:
    """A multi-turn conversation. After each reply: its tool calls are answered by ``tool_results`` (name ->
    fake implementation, arguments -> result text); a reply without calls gets the next of ``user_turns``; the
    script ends when neither applies or after ``max_turns`` replies."""
    tool_results: Mapping[str, ToolFake] = field(default_factory=dict)
    user_turns: tuple[str, ...] = ()
    max_turns: int = 6

    def answer(self, reply: Reply) -> list[Message]:
        """The tool messages that answer the reply's calls: role "tool" for API calls, one user message of
        ``<tool_response>`` blocks for calls written in the text."""
        results = []
        for call in reply.calls():
            fake = self.tool_results.get(call.name)
            try:
                args = call.args()
            except ValueError as e:
                results.append((call, f"error: {e}"))
                continue
            if fake is None:
                results.append((call, f"error: unknown tool {call.name!r}; tools: {', '.join(self.tool_results)}"))
            else:
                results.append((call, fake(args)))
        if reply.tool_calls:
            return [{"role": "tool", "tool_call_id": call.id, "content": result} for call, result in results]
        return [{"role": "user",
                 "content": "\n".join(f"<tool_response>\n{result}\n</tool_response>" for _, result in results)}]


@dataclass(frozen=True)
class Test:
    """One capability test. ``messages``: the conversation, or a function of the Options that builds it.
    ``repeats``: the request is sent that many times (``reply.runs``); ``stream``: sent with SSE streaming;
    ``solo``: timed, so run while no other request is in flight; ``script``: a multi-turn conversation;
    ``times_only``: the grader reads the timings, not the answer, so a reply the cap cut is graded as it is (never
    "truncated")."""
    __test__ = False  # not a pytest test class
    id: str
    category: str
    messages: Sequence[Message] | Callable[[Options], Sequence[Message]]
    grade: Callable[[Reply], Grade]
    tools: Sequence[Message] = ()
    tool_choice: str | None = None
    response_format: Message | None = None
    max_tokens: int = 512
    repeats: int = 1
    stream: bool = False
    solo: bool = False
    script: Script | None = None
    times_only: bool = False

    def conversation(self, options: Options) -> list[Message]:
        return list(self.messages(options) if callable(self.messages) else self.messages)

    def request(self, messages: Sequence[Message]) -> dict[str, Any]:
        """Keyword arguments for ``client.chat.completions.create`` (the runner adds model and sampling)."""
        request: dict[str, Any] = {"messages": list(messages), "max_tokens": self.max_tokens}
        if self.tools:
            request["tools"] = list(self.tools)
        if self.tool_choice is not None:
            request["tool_choice"] = self.tool_choice
        if self.response_format is not None:
            request["response_format"] = self.response_format
        if self.stream:
            request["stream"] = True
            request["stream_options"] = {"include_usage": True}
        return request


def conduct(test: Test, ask: Callable[[dict[str, Any]], Reply], options: Options | None = None) -> Reply:
    """Play one test: ``ask`` sends one request (``Test.request``'s keyword arguments) and returns its Reply.
    Returns the reply to grade: with ``runs`` for a repeated test, with ``turns`` for a script."""
    messages = test.conversation(options or Options())
    if test.script is None:
        runs = tuple(ask(test.request(messages)) for _ in range(test.repeats))
        return replace(runs[0], runs=runs) if test.repeats > 1 else runs[0]
    script, users = test.script, list(test.script.user_turns)
    turns: list[Reply] = []
    while len(turns) < script.max_turns:
        reply = ask(test.request(messages))
        turns.append(reply)
        messages.append(reply.assistant_message())
        if reply.calls() and script.tool_results:
            messages.extend(script.answer(reply))
        elif users:
            messages.append({"role": "user", "content": users.pop(0)})
        else:
            break
    return replace(turns[-1], turns=tuple(turns))


_REGISTRY: dict[str, Test] = {}


def register(test: Test) -> Test:
    """Add a test to the suite (ids are unique across categories)."""
    if test.id in _REGISTRY:
        raise ValueError(f"duplicate test id {test.id!r}")
    _REGISTRY[test.id] = test
    return test


def registered() -> list[Test]:
    return list(_REGISTRY.values())
