"""basic: a reply at all, instruction following, system prompt, factual QA, clean stop, determinism."""
from __future__ import annotations

import re

from steps.evalsuite.core import Grade, Reply, Test, fail, ok, register
from steps.evalsuite.text import clip, has_word


def _user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _ping(reply: Reply) -> Grade:
    word = reply.text.strip(" \t\n.!\"'`*").lower()
    return ok("replied pong") if word == "pong" else fail(f"expected exactly 'pong', got {clip(reply.text)!r}")


register(Test("ping", "basic", _user("Reply with exactly one word: pong"), _ping, max_tokens=16))


def _three_fruits(reply: Reply) -> Grade:
    lines = [line.strip() for line in reply.text.splitlines() if line.strip()]
    if len(lines) != 3:
        return fail(f"expected 3 lines, got {len(lines)}: {clip(reply.text)!r}")
    bad = [line for line in lines if not re.fullmatch(r"[a-z]+(?: [a-z]+)?", line)]
    if bad:
        return fail(f"not a bare lowercase fruit name: {bad[0]!r}")
    if len(set(lines)) != 3:
        return fail(f"fruits repeat: {lines}")
    return ok(f"three lines: {', '.join(lines)}")


register(Test("instruction_following", "basic",
              _user("List exactly three different fruits, one per line, in lowercase letters only. No numbering, "
                    "no bullets, no punctuation and no other text."), _three_fruits, max_tokens=48))


def _prefixed(reply: Reply) -> Grade:
    if not reply.text.startswith("[ACK]"):
        return fail(f"does not start with [ACK]: {clip(reply.text)!r}")
    if not has_word(reply.text, "Jupiter"):
        return fail(f"does not answer the question (Jupiter): {clip(reply.text)!r}")
    return ok("starts with [ACK] and answers Jupiter")


register(Test("system_prompt", "basic", [
    {"role": "system", "content": "Begin every reply with the exact prefix [ACK] followed by a space, then answer."},
    {"role": "user", "content": "Which planet is the largest in the solar system?"}], _prefixed, max_tokens=64))


def _canberra(reply: Reply) -> Grade:
    if not has_word(reply.text, "Canberra"):
        return fail(f"no Canberra in {clip(reply.text)!r}")
    if has_word(reply.text, "Sydney") or has_word(reply.text, "Melbourne"):
        return fail(f"names another city too: {clip(reply.text)!r}")
    return ok("Canberra")


register(Test("factual_qa", "basic",
              _user("What is the capital city of Australia? Answer with the city name only."), _canberra,
              max_tokens=32))

_JUNK = ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>",
         "<|assistant|>", "<|user|>", "[INST]")


def _clean_stop(reply: Reply) -> Grade:
    if reply.finish_reason != "stop":
        return fail(f"finish_reason is {reply.finish_reason!r}, not 'stop'")
    if not reply.text:
        return fail("empty reply")
    junk = next((token for token in _JUNK if token in reply.content), None)
    if junk:
        return fail(f"special token {junk!r} in the text")
    if re.search(r"(?im)^\s*(user|human|assistant|system)\s*:", reply.text):
        return fail(f"goes on with another turn: {clip(reply.text)!r}")
    if len(reply.text) > 300:
        return fail(f"{len(reply.text)} characters for one short sentence")
    return ok(f"stopped cleanly after {len(reply.text)} characters")


register(Test("clean_stop", "basic", _user("Say hello to me in one short sentence."), _clean_stop, max_tokens=96))


def _same_twice(reply: Reply) -> Grade:
    """The runs' answers (thinking left out) are one and the same, and not empty: two unfinished think blocks are
    no answer."""
    texts = [run.text for run in reply.runs]
    if len(texts) < 2:
        return fail(f"{len(texts)} run(s); determinism needs 2")
    if empty := [i for i, text in enumerate(texts, 1) if not text]:
        cut = " (cut off in its thinking)" if any(reply.runs[i - 1].cut() == "thinking" for i in empty) else ""
        return fail(f"empty answer in run {', '.join(map(str, empty))}{cut}")
    for i, other in enumerate(texts[1:], 2):
        if other != texts[0]:
            at = next((k for k, (a, b) in enumerate(zip(texts[0], other, strict=False)) if a != b),
                      min(len(texts[0]), len(other)))
            return fail(f"run {i} differs from run 1 at character {at}: {clip(other[at:at + 40])!r} "
                        f"vs {clip(texts[0][at:at + 40])!r}")
    return ok(f"{len(texts)} identical replies")


register(Test("determinism", "basic", _user("Write one sentence about the sea."), _same_twice, max_tokens=64,
              repeats=2))
