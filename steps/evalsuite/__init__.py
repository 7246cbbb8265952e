"""The capability suite: 44 tests in 9 categories, each a request and a grader, for llama-server's OpenAI API, and
the optional ``frontend`` category (6 whole pages, parsed and loaded in a browser), run only when asked for.

    from steps import evalsuite
    for test in evalsuite.all_tests(categories=["basic"]):
        reply = evalsuite.conduct(test, ask, options)   # ask(request kwargs) -> Reply, from the openai client
        grade = test.grade(reply)                       # Grade(passed, reason)

Each category is one module of this package; ``suite_digest()`` keys evals on the suite's own source.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path

import blake3

from steps.evalsuite.core import (Grade, Message, Options, Reply, Script, Test, Timing, ToolCall, conduct, register,
                                  registered)

CATEGORIES = ("basic", "reasoning", "tools", "agentic", "structured", "context", "multilingual", "programming",
              "performance", "frontend")
DEFAULT_CATEGORIES = CATEGORIES[:-1]                # frontend: long generations, asked for by name

__all__ = ["CATEGORIES", "DEFAULT_CATEGORIES", "Grade", "Message", "Options", "Reply", "Script", "Test", "Timing",
           "ToolCall", "all_tests", "conduct", "register", "suite_digest"]


def all_tests(categories: Iterable[str] | None = None, ids: Iterable[str] | None = None) -> list[Test]:
    """The registered tests in category order: those of ``categories`` (default: DEFAULT_CATEGORIES, or every
    category when ``ids`` are given) and/or ``ids``; ValueError naming an unknown category or id."""
    for name in CATEGORIES:
        importlib.import_module(f"steps.evalsuite.{name}")
    tests = registered()
    wanted_categories = set(categories if categories is not None else CATEGORIES if ids is not None
                            else DEFAULT_CATEGORIES)
    wanted_ids = None if ids is None else set(ids)
    if unknown := sorted(wanted_categories - set(CATEGORIES)):
        raise ValueError(f"unknown test categories {unknown}; known: {', '.join(CATEGORIES)}")
    if wanted_ids is not None and (unknown := sorted(wanted_ids - {t.id for t in tests})):
        raise ValueError(f"unknown test ids {unknown}; known: {', '.join(t.id for t in tests)}")
    return sorted((t for t in tests if t.category in wanted_categories and (wanted_ids is None or t.id in wanted_ids)),
                  key=lambda t: CATEGORIES.index(t.category))


def suite_digest() -> str:
    """blake3 of this package's source files (names and bytes): a changed prompt or grader changes it."""
    h = blake3.blake3()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
