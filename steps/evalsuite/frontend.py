"""frontend (optional category): six whole pages (one HTML file with its CSS and JavaScript), graded like a reviewer
would: parsed with real parsers, then, where a Chromium is installed, loaded and clicked through in it.

Every page is checked for: HTML that html5lib parses without a parse error, CSS that tinycss2 parses without an
error (unbalanced braces included), JavaScript that tree-sitter's JavaScript grammar parses without an error node,
no external resources (the prompt asks for one self-contained file), and then the page's own requirements: elements
by CSS selector and count, CSS features (custom properties, media queries, grid, keyframes), JavaScript features
found in the syntax tree (a call of ``requestAnimationFrame``, ``new IntersectionObserver``, a ``keydown``
listener), and behaviour in the browser (clicking ``#qty-plus`` increments ``#qty``, the table sorts, the password
meter says "weak").

The browser runs in the sandbox (``steps.sandbox`` language ``browser``: bubblewrap with no network, or the
rlimits fallback, where the browser's own router still aborts every request but the page's), headless, with
playwright driving the Chromium at ``browser_executable()`` (Debian's ``chromium``; ``MERGEFORGE_CHROMIUM`` names
another). It reports console errors and uncaught exceptions, counts elements in the live DOM (after the page's
scripts ran), runs the behaviour checks, and returns a screenshot, which the eval keeps with the generated page.
Without a Chromium the element checks run on html5lib's tree, the behaviour checks are not run, and the reason says
so (the eval's key records the browser, so results of the two set-ups never mix).

This module holds the six tests and ``grade_page``; the parts live beside it: ``page_parse`` (``Page``: the parsers
and the selector engine), ``page_checks`` (``Check`` and its constructors ``elements``, ``static``, ``behaviour``)
and ``browser`` (the Chromium: ``browser_executable``, ``browser_version``, ``in_browser``), re-exported here.
"""
from __future__ import annotations

import base64
import json
import re

from steps.evalsuite.browser import (BROWSER_CHECK, BROWSER_MEMORY_MB, BROWSER_SECONDS, MARK, PAGE_URL, SCREENSHOT,
                                     browser_executable, browser_version, in_browser)
from steps.evalsuite.core import Grade, Reply, Test, fail, register
from steps.evalsuite.page_checks import Check, behaviour, elements, static
from steps.evalsuite.page_parse import Page, select
from steps.evalsuite.text import clip, code_blocks

__all__ = ["BROWSER_CHECK", "BROWSER_MEMORY_MB", "BROWSER_SECONDS", "MARK", "MAX_TOKENS", "PAGE_URL", "REPLY_FORMAT",
           "SCREENSHOT", "SELF_CONTAINED", "Check", "Page", "behaviour", "browser_executable", "browser_version",
           "elements", "grade_page", "in_browser", "page_html", "page_test", "select", "static"]

MAX_TOKENS = 8192
SELF_CONTAINED = ("Write one complete, self-contained HTML file (inline <style> and <script>, no external files, "
                  "fonts, images or libraries) for: ")
REPLY_FORMAT = "\n\nReply with the whole file in one fenced ```html code block."


def page_html(reply: Reply) -> str | None:
    """The page: the first ```html block, else the first fenced block that is a document (starts with a doctype or
    <html>), else the first unlabelled block that starts with a tag, else the text itself when it is a document."""
    blocks = code_blocks(reply.text)
    for lang, code in blocks:
        if lang in ("html", "htm", "xhtml"):
            return code
    for _, code in blocks:
        if re.match(r"(?i)\s*(<!--.*?-->\s*)*(<!doctype html|<html[\s>])", code, re.S):
            return code
    for lang, code in blocks:     # an unlabelled block of markup: graded as the page it would be in a browser
        if lang in ("", "text", "markup", "xml", "svg") and re.match(r"\s*<[!a-zA-Z]", code):
            return code
    text = reply.text.strip()
    return text if re.match(r"(?i)(<!doctype html|<html[\s>])", text) else None


def grade_page(reply: Reply, checks: list[Check]) -> Grade:
    html = page_html(reply)
    if html is None:
        return fail(f"no HTML document (no ```html block): {clip(reply.text, 120)!r}")
    page = Page.parse(html)
    results: list[tuple[str, bool, str]] = [
        ("HTML parses", not page.html_errors, f"{len(page.html_errors)} html5lib errors, first: "
                                              f"{page.html_errors[0]}" if page.html_errors else ""),
        ("CSS parses", not page.css_errors, page.css_errors[0] if page.css_errors else ""),
        ("JavaScript parses", not page.js_errors, page.js_errors[0] if page.js_errors else ""),
        ("self-contained", not page.external, f"loads {page.external[0]}" if page.external else "")]
    for check in checks:
        if check.static is not None:
            try:
                good = bool(check.static(page))
            except Exception as e:  # noqa: BLE001 - a predicate on odd input fails its check
                results.append((check.label, False, f"{type(e).__name__}: {e}"))
                continue
            results.append((check.label, good, ""))
    artifacts: dict[str, bytes] = {"page.html": html.encode("utf-8")}
    browser = browser_executable()
    loaded = in_browser(page, checks) if browser else "no Chromium"
    if isinstance(loaded, dict):
        results.append(("no console errors", not loaded["console"], loaded["console"][0] if loaded["console"] else ""))
        counts = iter(loaded["counts"])
        runs = iter(loaded["behaviour"])
        if loaded.get("screenshot"):
            artifacts["screenshot.png"] = base64.b64decode(loaded["screenshot"])
    elif browser:
        results.append(("loads in the browser", False, loaded))
    for check in checks:
        if check.elements is not None:
            selector, least, most = check.elements
            n = next(counts) if isinstance(loaded, dict) else page.count(selector)
            good = n >= least and (most is None or n <= most)
            want = f"{least}" if most == least else f"{least}..{most}" if most is not None else f">= {least}"
            results.append((check.label, good, f"{n} x {selector!r}, expected {want}"))
        elif check.behaviour is not None and isinstance(loaded, dict):
            good, why = next(runs)
            results.append((check.label, good, why))
    failed = [(label, why) for label, good, why in results if not good]
    reason = f"{len(results) - len(failed)}/{len(results)} checks"
    skipped = sum(1 for c in checks if c.behaviour) if not isinstance(loaded, dict) else 0
    if skipped:
        reason += f" ({skipped} behaviour checks not run: {'no Chromium' if not browser else 'not loaded'})"
    if failed:
        reason += "; failed: " + "; ".join(f"{label}" + (f" ({clip(why, 120)})" if why else "")
                                           for label, why in failed[:4])
    return Grade(not failed, reason, artifacts)


def page_test(id: str, prompt: str, checks: list[Check]) -> Test:
    return register(Test(id, "frontend", [{"role": "user", "content": SELF_CONTAINED + prompt + REPLY_FORMAT}],
                         lambda reply: grade_page(reply, checks), max_tokens=MAX_TOKENS))


def _click(selector: str) -> str:
    return f"document.querySelector({json.dumps(selector)}).click()"


def _type(selector: str, value: str) -> str:
    return (f"(() => {{ const el = document.querySelector({json.dumps(selector)}); el.value = {json.dumps(value)}; "
            "el.dispatchEvent(new Event('input', {bubbles: true})); el.dispatchEvent(new Event('keyup', "
            "{bubbles: true})); el.dispatchEvent(new Event('change', {bubbles: true})); })()")


_SETTLE = "await new Promise(r => setTimeout(r, 100))"
_VISIBLE = "(el => !!el && getComputedStyle(el).display !== 'none' && getComputedStyle(el).visibility !== 'hidden')"


page_test("weather_dashboard", (
    "a weather dashboard. An <h1> with the city name; a current-conditions card with id `current`; a 5-day "
    "forecast: an element with id `forecast` holding exactly 5 elements with class `day`, laid out with CSS grid; "
    "colours as CSS custom properties on :root, used with var(); a dark theme under "
    "@media (prefers-color-scheme: dark); a layout change under @media (max-width: 600px); every temperature in an "
    "element with class `temp`, and a button with id `unit-toggle` that switches all temperatures between °C and "
    "°F."), [
    elements("city heading", "h1"),
    elements("current-conditions card", "#current"),
    elements("5-day forecast", "#forecast .day", 5, 5),
    static("CSS grid", lambda p: p.css_value("display", r"\bgrid\b")),
    static("custom properties on :root, used with var()",
           lambda p: any(s.startswith(":root") for s in p.selectors) and p.css_value(r"--[\w-]+", "")
           and p.css_value(r"[\w-]+", r"var\(\s*--")),
    static("dark mode media query", lambda p: p.at_rule("media", r"prefers-color-scheme\s*:\s*dark") > 0),
    static("responsive breakpoint", lambda p: p.at_rule("media", r"max-width\s*:\s*600px") > 0),
    elements("temperatures", ".temp", 6),
    behaviour("unit toggle changes the temperatures",
              "(() => { const t = () => [...document.querySelectorAll('.temp')].map(e => e.textContent).join('|'); "
              f"const before = t(); {_click('#unit-toggle')}; return t() !== before && /°?F/.test(t()) !== "
              "/°?F/.test(before); })()"),
])

page_test("product_page", (
    "an e-commerce product page. An image gallery: a main image with id `main-image` and at least 3 thumbnail "
    "<img> elements with class `thumb`; clicking a thumbnail shows its image in `main-image` (sets its src). At "
    "least 3 colour swatches as <button class=\"swatch\">. A quantity input <input type=\"number\" id=\"qty\" "
    "value=\"1\"> with buttons `qty-minus` and `qty-plus` (ids) that change it by one, never below 1. A price in an "
    "element with id `price`. Three tabs (Description, Specifications, Reviews) as elements with role=\"tab\" and "
    "three panels with role=\"tabpanel\"; clicking a tab shows its panel and hides the others. A buy bar with id "
    "`buy-bar` that is position: sticky or fixed at the bottom on screens narrower than 768px."), [
    elements("main image", "img#main-image", 1, 1),
    elements("thumbnails", "img.thumb", 3),
    elements("colour swatches", "button.swatch", 3),
    elements("quantity input", "input#qty[type=number]", 1, 1),
    elements("quantity buttons", "#qty-minus, #qty-plus", 2, 2),
    elements("price", "#price", 1, 1),
    elements("tabs and panels", "[role=tab], [role=tabpanel]", 6),
    static("sticky or fixed buy bar on small screens",
           lambda p: p.css_value("position", r"sticky|fixed", r"max-width")),
    behaviour("thumbnail click sets the main image",
              "(async () => { const main = document.querySelector('#main-image'); "
              "const thumbs = [...document.querySelectorAll('img.thumb')]; const t = thumbs[thumbs.length - 1]; "
              f"t.click(); {_SETTLE}; return main.getAttribute('src') === t.getAttribute('src') || "
              "main.src === t.src || main.src === (t.dataset.full && new URL(t.dataset.full, location.href).href); "
              "})()"),
    behaviour("quantity plus and minus, never below 1",
              "(() => { const q = document.querySelector('#qty'); q.value = '1'; "
              f"{_click('#qty-plus')}; {_click('#qty-plus')}; const up = +q.value; "
              f"{_click('#qty-minus')}; {_click('#qty-minus')}; {_click('#qty-minus')}; "
              "return up === 3 && +q.value === 1; })()"),
    behaviour("tabs switch panels",
              "(async () => { const tabs = [...document.querySelectorAll('[role=tab]')]; "
              "const panels = [...document.querySelectorAll('[role=tabpanel]')]; "
              f"tabs[1].click(); {_SETTLE}; const v = {_VISIBLE}; "
              "return v(panels[1]) && !v(panels[0]) && !v(panels[2]); })()"),
])

page_test("landing_page", (
    "an animated SaaS landing page. A <nav> that stays at the top (position fixed or sticky) and gets the class "
    "`scrolled` once the page is scrolled down more than 50px; a hero with an animated CSS gradient background "
    "(@keyframes); a headline with id `typed` that types itself out letter by letter with JavaScript; at least 3 "
    "sections with class `reveal` that fade in when scrolled into view, using IntersectionObserver; a testimonial "
    "carousel: an element with id `testimonials` holding at least 3 elements with class `testimonial`, rotating "
    "automatically (setInterval); exactly 3 pricing tiers, elements with class `tier`. Make the page at least "
    "three screens tall."), [
    elements("navigation", "nav"),
    static("fixed or sticky nav", lambda p: p.css_value("position", r"fixed|sticky")),
    static("animated gradient", lambda p: p.at_rule("keyframes") + p.at_rule("-webkit-keyframes") > 0
           and p.css_value(r"background(-image)?", r"gradient\(") and p.css_value(r"animation(-name)?", r"\w")),
    elements("typed headline", "#typed", 1, 1),
    elements("reveal sections", ".reveal", 3),
    static("IntersectionObserver", lambda p: p.js_new("IntersectionObserver")),
    elements("testimonials", "#testimonials .testimonial", 3),
    static("carousel timer", lambda p: p.js_calls("setInterval") or p.js_calls("setTimeout")),
    elements("pricing tiers", ".tier", 3, 3),
    behaviour("nav gets `scrolled` on scroll",
              "(async () => { window.scrollTo(0, 400); window.dispatchEvent(new Event('scroll')); "
              "await new Promise(r => setTimeout(r, 300)); "
              "return document.querySelector('nav').classList.contains('scrolled'); })()"),
    behaviour("headline types itself",
              "(async () => { const el = document.querySelector('#typed'); const a = el.textContent; "
              "await new Promise(r => setTimeout(r, 700)); return el.textContent.length > 0 && "
              "el.textContent !== a; })()"),
])

page_test("analytics_dashboard", (
    "an analytics dashboard with a dark theme and a CSS grid layout. An inline SVG bar chart (an <svg id=\"bars\"> "
    "with at least 5 <rect> bars) that shows a tooltip element with id `tooltip` when a bar is hovered; an SVG donut "
    "chart (<svg id=\"donut\"> with at least 3 <circle> or <path> segments); a table with id `data` with a <thead> "
    "of at least 3 columns and a <tbody> of at least 6 rows whose first column is a name, sortable by clicking a "
    "header (clicking the first header sorts the rows by name); a sidebar with id `sidebar` that a button with id "
    "`sidebar-toggle` collapses and expands (toggling a class on the sidebar)."), [
    elements("bar chart", "svg#bars rect", 5),
    elements("donut chart", "svg#donut circle, svg#donut path", 3),
    elements("tooltip", "#tooltip", 1, 1),
    static("hover listener", lambda p: any(p.js_calls("addEventListener", e) for e in
                                           ("mouseover", "mouseenter", "mousemove", "pointerenter", "pointerover",
                                            "pointermove"))),
    elements("table header", "table#data thead th", 3),
    elements("table rows", "table#data tbody tr", 6),
    static("CSS grid", lambda p: p.css_value("display", r"\bgrid\b")),
    elements("sidebar and its toggle", "#sidebar, #sidebar-toggle", 2, 2),
    behaviour("first header sorts by name",
              "(async () => { const names = () => [...document.querySelectorAll('table#data tbody tr')]"
              ".map(r => r.cells[0].textContent.trim()); const sorted = [...names()].sort((a, b) => "
              "a.localeCompare(b)); document.querySelector('table#data thead th').click(); "
              f"{_SETTLE}; let n = names(); if (n.join() !== sorted.join() && n.join() !== [...sorted].reverse()"
              ".join()) { document.querySelector('table#data thead th').click(); "
              f"{_SETTLE}; n = names(); }} return n.join() === sorted.join() || "
              "n.join() === [...sorted].reverse().join(); })()"),
    behaviour("sidebar toggles",
              "(async () => { const s = document.querySelector('#sidebar'); const a = s.className + "
              f"s.getBoundingClientRect().width; {_click('#sidebar-toggle')}; {_SETTLE}; "
              "return s.className + s.getBoundingClientRect().width !== a; })()"),
])

_STATES = ("Alabama", "Alaska", "Arizona", "Arkansas", "California", "Colorado", "Connecticut", "Delaware", "Florida",
           "Georgia", "Hawaii", "Idaho", "Illinois", "Indiana", "Iowa", "Kansas", "Kentucky", "Louisiana", "Maine",
           "Maryland", "Massachusetts", "Michigan", "Minnesota", "Mississippi", "Missouri", "Montana", "Nebraska",
           "Nevada", "New Hampshire", "New Jersey", "New Mexico", "New York", "North Carolina", "North Dakota", "Ohio",
           "Oklahoma", "Oregon", "Pennsylvania", "Rhode Island", "South Carolina", "South Dakota", "Tennessee",
           "Texas", "Utah", "Vermont", "Virginia", "Washington", "West Virginia", "Wisconsin", "Wyoming")

page_test("registration_wizard", (
    "a 3-step registration form wizard. Exactly 3 step containers with class `step`, only the current one visible; "
    "buttons with ids `next` and `back`; step 1: name and <input type=\"email\" id=\"email\">; step 2: "
    "<input type=\"password\" id=\"password\"> with a strength meter, an element with id `strength` whose text "
    "is Weak, Medium or Strong, updated as the user types (Weak for fewer than 8 characters, Strong for 12 or more "
    "with upper case, lower case, a digit and a symbol); step 3: a <select id=\"state\"> listing all 50 US states; "
    "inline validation messages; animated transitions between steps (CSS transition or animation); a success modal "
    "with id `success`, hidden until the form is submitted."), [
    elements("three steps", ".step", 3, 3),
    elements("next and back buttons", "#next, #back", 2, 2),
    elements("email and password inputs", "input#email[type=email], input#password[type=password]", 2, 2),
    elements("strength meter", "#strength", 1, 1),
    elements("all 50 states", "select#state option", 50, 51),
    static("every state listed", lambda p: all(s in p.html for s in _STATES)),
    static("animated transitions", lambda p: p.css_value(r"transition(-property)?|animation(-name)?", r"\w")),
    behaviour("only one step visible",
              f"(() => {{ const v = {_VISIBLE}; return [...document.querySelectorAll('.step')].filter(v).length "
              "=== 1; })()"),
    behaviour("strength meter says weak and strong",
              f"(async () => {{ {_type('#password', 'abc')}; {_SETTLE}; "
              "const weak = /weak/i.test(document.querySelector('#strength').textContent); "
              f"{_type('#password', 'Tr0ub4dor&3xyz!')}; {_SETTLE}; "
              "const strong = /strong/i.test(document.querySelector('#strength').textContent); "
              "return weak && strong; })()"),
    behaviour("success modal hidden at first", f"!{_VISIBLE}(document.querySelector('#success'))"),
])

page_test("snake_game", (
    "a Snake game on a <canvas id=\"game\">. A requestAnimationFrame game loop, arrow-key controls (keydown), "
    "collision with the walls and with itself, food that makes the snake grow, the score in an element with id "
    "`score` and the best score in an element with id `high-score`, kept in localStorage; the game speeds up as the "
    "score grows, and restarts with the space bar after a game over."), [
    elements("canvas", "canvas#game", 1, 1),
    elements("score and high score", "#score, #high-score", 2, 2),
    static("requestAnimationFrame loop", lambda p: p.js_calls("requestAnimationFrame")),
    static("keydown listener", lambda p: p.js_calls("addEventListener", "keydown")
           or "onkeydown" in p.js_names()),
    static("arrow keys handled", lambda p: sum(k in p.js_strings() | p.js_names() for k in (
        "ArrowUp", "ArrowDown", "ArrowLeft", "ArrowRight")) == 4
           or all(str(c) in p.html for c in (37, 38, 39, 40))),
    static("localStorage high score", lambda p: "localStorage" in p.js_names()),
    behaviour("draws on the canvas",
              "(async () => { await new Promise(r => setTimeout(r, 500)); const c = document.querySelector('#game');"
              " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; "
              "for (let i = 3; i < d.length; i += 4) if (d[i] !== 0) return true; return false; })()"),
    behaviour("the game moves after an arrow key",
              "(async () => { const c = document.querySelector('#game'); const g = c.getContext('2d'); "
              "const frame = () => g.getImageData(0, 0, c.width, c.height).data.join(); "
              "document.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowDown', code: 'ArrowDown', keyCode: 40, "
              "bubbles: true})); await new Promise(r => setTimeout(r, 150)); const a = frame(); "
              "await new Promise(r => setTimeout(r, 600)); return frame() !== a; })()"),
])
