"""The frontend category's requirements: a ``Check`` is one requirement on a page, made with ``elements``
(selector counts), ``static`` (a predicate of the parsed ``Page``) or ``behaviour`` (JavaScript run in the browser).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from steps.evalsuite.page_parse import Page


@dataclass(frozen=True)
class Check:
    """One requirement. ``elements``: (selector, least, most) counted in the live DOM, or on html5lib's tree without
    a browser; ``static``: a predicate of the parsed Page; ``behaviour``: a JavaScript expression (it may await)
    evaluated in the loaded page, true when the page behaves; run only in a browser."""
    label: str
    elements: tuple[str, int, int | None] | None = None
    static: Callable[[Page], bool] | None = None
    behaviour: str | None = None


def elements(label: str, selector: str, least: int = 1, most: int | None = None) -> Check:
    return Check(label, elements=(selector, least, most))


def static(label: str, predicate: Callable[[Page], bool]) -> Check:
    return Check(label, static=predicate)


def behaviour(label: str, script: str) -> Check:
    return Check(label, behaviour=script)
