"""reasoning: a math word problem, a logic puzzle, a rate problem, reading code. Each ends with ``Answer: ...``."""
from __future__ import annotations

from collections.abc import Callable

from steps.evalsuite.core import Grade, Reply, Test, fail, ok, register
from steps.evalsuite.text import answer, clip, first_number, has_word

_FORMAT = "\n\nThink step by step, then end with a last line of the form `Answer: <{}>`."


def _numeric(expected: float) -> Callable[[Reply], Grade]:
    """The number the last ``Answer:`` line gives (its first: the prompt asks for ``Answer: <number>``) must be
    ``expected``."""
    def grade(reply: Reply) -> Grade:
        line = answer(reply.text)
        if line is None:
            return fail(f"no 'Answer:' line in {clip(reply.text[-200:])!r}")
        got = first_number(line)
        if got is None:
            return fail(f"no number on the answer line: {line!r}")
        if abs(got - expected) > 1e-6:
            return fail(f"answered {got:g}, expected {expected:g}")
        return ok(f"answered {got:g}")
    return grade


def _ask(prompt: str, shape: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt + _FORMAT.format(shape)}]


# Monday 48*3 + 96*2 = 336; Tuesday 33*3 + 96*2 = 291; together 627.
register(Test("math_word_problem", "reasoning", _ask(
    "A bakery sells muffins for $3 each and cookies for $2 each. On Monday it sold 48 muffins and twice as many "
    "cookies as muffins. On Tuesday it sold 15 fewer muffins than on Monday and the same number of cookies as on "
    "Monday. How many dollars did the bakery take in over the two days?", "number"), _numeric(627), max_tokens=768))


def _alice(reply: Reply) -> Grade:
    line = answer(reply.text)
    if line is None:
        return fail(f"no 'Answer:' line in {clip(reply.text[-200:])!r}")
    names = [name for name in ("Alice", "Bob", "Carol", "Dave") if has_word(line, name)]
    if names != ["Alice"]:
        return fail(f"answered {line!r}, expected Alice")
    return ok("Alice")


# Bob: fish; Carol: neither cat nor parrot, so dog; Dave: not the cat, so parrot; Alice: cat.
register(Test("logic_puzzle", "reasoning", _ask(
    "Alice, Bob, Carol and Dave each own exactly one pet: a cat, a dog, a parrot or a fish, no two the same. "
    "Bob owns the fish. Carol owns neither the cat nor the parrot. Dave does not own the cat. "
    "Who owns the cat?", "name"), _alice, max_tokens=768))

# 3 pumps: 1200 l in 40 min, so one pump 10 l/min; 5 pumps 50 l/min; 3000 l take 60 min.
register(Test("rate_problem", "reasoning", _ask(
    "Three identical pumps fill a 1200-litre tank in 40 minutes. How many minutes do five of these pumps take to "
    "fill a 3000-litre tank?", "number of minutes"), _numeric(60), max_tokens=768))

# xs[::2] = [3, 4, 5, 2]: the odd ones sum to 8, doubled (the last element, 6, is even) 16, less 8 elements: 8.
register(Test("code_reading", "reasoning", _ask(
    "What does this Python program print?\n\n```python\nxs = [3, 1, 4, 1, 5, 9, 2, 6]\n"
    "total = sum(x for x in xs[::2] if x % 2)\nif xs[-1] % 2 == 0:\n    total *= 2\nprint(total - len(xs))\n```",
    "the printed value"), _numeric(8), max_tokens=768))
