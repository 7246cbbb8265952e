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
"""
from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from steps.evalsuite.core import Grade, Reply, Test, fail, register
from steps.evalsuite.text import clip, code_blocks

MAX_TOKENS = 8192
BROWSER_SECONDS = 60.0
BROWSER_MEMORY_MB = 2048
SCREENSHOT = (1024, 768)
MARK = "@@frontend "
PAGE_URL = "http://page.invalid/"          # the page's origin in the browser (localStorage needs one); served from
                                           # the route, every other request aborted
SELF_CONTAINED = ("Write one complete, self-contained HTML file (inline <style> and <script>, no external files, "
                  "fonts, images or libraries) for: ")
REPLY_FORMAT = "\n\nReply with the whole file in one fenced ```html code block."


# ------------------------------------------------------------------------------------------------------- parsing

@dataclass
class Page:
    """A generated page, parsed: the html5lib tree and its parse errors, the CSS rules (tinycss2) and the scripts
    (tree-sitter), with the helpers the checks use."""
    html: str
    doc: Any = None
    html_errors: list[str] = field(default_factory=list)
    css_errors: list[str] = field(default_factory=list)
    js_errors: list[str] = field(default_factory=list)
    declarations: list[tuple[str, str, str]] = field(default_factory=list)  # (at-rule context, property, value)
    at_rules: list[tuple[str, str]] = field(default_factory=list)           # (name, prelude)
    selectors: list[str] = field(default_factory=list)
    js_trees: list[Any] = field(default_factory=list)
    external: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, html: str) -> Page:
        import html5lib
        parser = html5lib.HTMLParser(tree=html5lib.getTreeBuilder("etree"), namespaceHTMLElements=False)
        page = cls(html, parser.parse(html))
        page.html_errors = [f"line {line}:{col} {code}" for (line, col), code, _ in parser.errors]
        for i, el in enumerate(page.doc.iter("style")):
            page._css("".join(el.itertext()), f"<style> #{i + 1}")
        for el in page.doc.iter():
            if isinstance(el.tag, str) and el.get("style"):
                page._css(f"x{{{el.get('style')}}}", f"style attribute of <{el.tag}>")
        for i, el in enumerate(page.doc.iter("script")):
            kind = (el.get("type") or "text/javascript").lower()
            if el.get("src"):
                page.external.append(f"<script src={el.get('src')!r}>")
            elif kind in ("text/javascript", "module", "application/javascript", "text/ecmascript"):
                page._js("".join(el.itertext()), f"<script> #{i + 1}")
        for el in page.doc.iter():
            if not isinstance(el.tag, str):
                continue
            for name, value in el.attrib.items():
                if name.startswith("on") and value.strip():
                    page._js(value, f"{name} attribute of <{el.tag}>")
            if el.tag == "link" and "stylesheet" in (el.get("rel") or "").lower():
                page.external.append(f"<link rel=stylesheet href={el.get('href')!r}>")
            if el.tag in ("img", "iframe", "video", "audio", "source") and re.match(r"(?i)\s*(https?:)?//",
                                                                                     el.get("src") or ""):
                page.external.append(f"<{el.tag} src={el.get('src')!r}>")
        return page

    def _css(self, css: str, where: str) -> None:
        import tinycss2
        sentinel = "mergeforge-end"
        rules = tinycss2.parse_stylesheet(css + f"\n{sentinel}{{}}", skip_comments=True, skip_whitespace=True)
        if not any(r.type == "qualified-rule" and tinycss2.serialize(r.prelude).strip() == sentinel for r in rules):
            self.css_errors.append(f"{where}: a block is not closed (unbalanced {{)")
        self._css_rules(rules, "", where)

    def _css_rules(self, rules: list[Any], context: str, where: str) -> None:
        import tinycss2
        for rule in rules:
            if rule.type == "error":
                self.css_errors.append(f"{where} line {rule.source_line}: {rule.message}")
            elif rule.type == "at-rule":
                name, prelude = rule.lower_at_keyword, tinycss2.serialize(rule.prelude).strip()
                self.at_rules.append((name, prelude))
                if rule.content is None:
                    continue
                inner = f"@{name} {prelude}"
                if name in ("media", "supports", "container", "layer", "document"):
                    self._css_rules(tinycss2.parse_rule_list(rule.content, skip_comments=True,
                                                             skip_whitespace=True), inner, where)
                else:   # @keyframes, @font-face, @page: their blocks hold rules or declarations
                    self._css_block(rule.content, inner, where)
            elif rule.type == "qualified-rule":
                selector = tinycss2.serialize(rule.prelude).strip()
                if "}" in selector:
                    self.css_errors.append(f"{where} line {rule.source_line}: unbalanced }} before "
                                           f"{clip(selector, 40)!r}")
                if selector != "mergeforge-end":
                    self.selectors.append(selector)
                self._css_block(rule.content, context, where)

    def _css_block(self, content: list[Any], context: str, where: str) -> None:
        import tinycss2
        items = tinycss2.parse_blocks_contents(content, skip_comments=True, skip_whitespace=True)
        for item in items:
            if item.type == "declaration":
                self.declarations.append((context, item.lower_name, tinycss2.serialize(item.value).strip().lower()))
            elif item.type == "error":
                self.css_errors.append(f"{where} line {item.source_line}: {item.message}")
            else:       # nested rules (CSS nesting, keyframe selectors)
                self._css_rules([item], context, where)

    def _js(self, source: str, where: str) -> None:
        tree = _js_parser().parse(source.encode("utf-8"))
        self.js_trees.append(tree)
        if tree.root_node.has_error:
            bad = next(_error_nodes(tree.root_node), None)
            at = f" at line {bad.start_point[0] + 1}:{bad.start_point[1] + 1}" if bad is not None else ""
            kind = f"missing {bad.type!r}" if bad is not None and bad.is_missing else "syntax error"
            self.js_errors.append(f"{where}: {kind}{at}")

    # -- CSS features
    def css_value(self, prop: str, pattern: str, context: str = "") -> bool:
        """A declaration of ``prop`` (a regex) whose value matches ``pattern``, inside an at-rule matching
        ``context`` (a regex; '' for anywhere)."""
        return any(re.fullmatch(prop, p) and re.search(pattern, v) and re.search(context, c)
                   for c, p, v in self.declarations)

    def at_rule(self, name: str, prelude: str = "") -> int:
        return sum(1 for n, p in self.at_rules if n == name and re.search(prelude, p, re.I))

    # -- JavaScript features, from the syntax trees
    def js_nodes(self, kind: str) -> Iterator[Any]:
        for tree in self.js_trees:
            stack = [tree.root_node]
            while stack:
                node = stack.pop()
                if node.type == kind:
                    yield node
                stack.extend(node.children)

    def js_calls(self, name: str, first_string: str | None = None) -> bool:
        """A call of ``name`` (a function or a method); with ``first_string``, whose first argument is a string
        literal matching it (``addEventListener("keydown", ...)``)."""
        for node in self.js_nodes("call_expression"):
            fn = node.child_by_field_name("function")
            if fn is None:
                continue
            callee = fn.child_by_field_name("property") if fn.type == "member_expression" else fn
            if callee is None or _text(callee) != name:
                continue
            if first_string is None:
                return True
            args = node.child_by_field_name("arguments")
            first = next((a for a in args.named_children if a.type != "comment"), None) if args else None
            if first is not None and first.type in ("string", "template_string") and re.fullmatch(
                    first_string, _text(first)[1:-1]):
                return True
        return False

    def js_new(self, name: str) -> bool:
        return any(_text(n.child_by_field_name("constructor")) == name for n in self.js_nodes("new_expression")
                   if n.child_by_field_name("constructor") is not None)

    def js_names(self) -> set[str]:
        return {_text(n) for kind in ("identifier", "property_identifier") for n in self.js_nodes(kind)}

    def js_strings(self) -> set[str]:
        return {_text(n) for n in self.js_nodes("string_fragment")}

    # -- elements, on html5lib's tree
    def count(self, selector: str) -> int:
        return sum(1 for _ in select(self.doc, selector))


@functools.cache
def _js_parser() -> Any:
    import tree_sitter_javascript
    from tree_sitter import Language, Parser
    return Parser(Language(tree_sitter_javascript.language()))


def _error_nodes(node: Any) -> Iterator[Any]:
    if node.type == "ERROR" or node.is_missing:
        yield node
        return
    for child in node.children:
        if child.has_error or child.is_missing:
            yield from _error_nodes(child)


def _text(node: Any) -> str:
    return node.text.decode("utf-8", "replace") if node is not None and node.text is not None else ""


# Selectors on html5lib's ElementTree: compound selectors (tag, #id, .class, [attr], [attr=value], [attr*=value])
# joined by descendant (space) and child (>) combinators, and selector lists (a, b). The browser uses its own engine.
_COMPOUND = re.compile(r"""(?P<tag>[a-zA-Z][\w-]*|\*)?(?P<rest>(?:\#[\w-]+|\.[\w-]+|\[[^\]]+\])*)""")
_PART = re.compile(r"""\#([\w-]+)|\.([\w-]+)|\[\s*([\w-]+)\s*(?:([*^$~]?=)\s*["']?([^"'\]]*)["']?\s*)?\]""")


def select(doc: Any, selector: str) -> Iterator[Any]:
    seen: set[int] = set()
    parents = {id(c): p for p in doc.iter() for c in p}
    for alternative in selector.split(","):
        steps = re.findall(r">|[^\s>]+", alternative.strip())
        for el in doc.iter():
            if isinstance(el.tag, str) and id(el) not in seen and _matches_path(el, steps, parents):
                seen.add(id(el))
                yield el


def _matches_path(el: Any, steps: list[str], parents: dict[int, Any]) -> bool:
    if not steps or not _matches(el, steps[-1]):
        return False
    rest = steps[:-1]
    if not rest:
        return True
    child_only = rest[-1] == ">"
    rest = rest[:-1] if child_only else rest
    parent = parents.get(id(el))
    while parent is not None:
        if _matches_path(parent, rest, parents):
            return True
        if child_only:
            return False
        parent = parents.get(id(parent))
    return False


def _matches(el: Any, compound: str) -> bool:
    m = _COMPOUND.fullmatch(compound)
    if m is None:
        raise ValueError(f"selector part {compound!r} is not supported")
    tag = el.tag.rsplit("}", 1)[-1]            # svg and math elements keep their namespace
    if m.group("tag") not in (None, "*") and tag.lower() != m.group("tag").lower():
        return False
    for ident, cls, attr, op, value in _PART.findall(m.group("rest")):
        if ident and el.get("id") != ident:
            return False
        if cls and cls not in (el.get("class") or "").split():
            return False
        if attr:
            have = el.get(attr)
            if have is None or (op == "=" and have != value) or (op == "*=" and value not in have) or (
                    op == "^=" and not have.startswith(value)) or (op == "$=" and not have.endswith(value)) or (
                    op == "~=" and value not in have.split()):
                return False
    return True


# -------------------------------------------------------------------------------------------------------- checks

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


@functools.cache
def browser_executable() -> str | None:
    """The Chromium to drive: ``MERGEFORGE_CHROMIUM``, else Debian's ``chromium`` (its binary, not the wrapper
    script), else one on PATH; None without one, or without playwright to drive it."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return None
    named = os.environ.get("MERGEFORGE_CHROMIUM")
    if named:
        return named if os.access(named, os.X_OK) else None
    for candidate in ("/usr/lib/chromium/chromium", *(shutil.which(n) for n in ("chromium", "chromium-browser",
                                                                                 "google-chrome"))):
        if candidate and os.access(candidate, os.X_OK):
            return os.path.realpath(candidate)
    return None


@functools.cache
def browser_version() -> str:
    """``Chromium 156.0.8078.79`` (what the eval's key records), or "none"."""
    exe = browser_executable()
    if exe is None:
        return "none"
    try:
        done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else "none"


# Runs inside the sandbox (language "browser"): serves page.html at PAGE_URL from a route that aborts every other
# request, and prints one verdict line.
BROWSER_CHECK = r'''
import base64, json, sys
from playwright.sync_api import sync_playwright

spec = json.load(open("spec.json"))
html = open("page.html", encoding="utf-8").read()
verdict = {"console": [], "counts": [], "behaviour": []}
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=spec["executable"], args=["--no-sandbox", "--disable-gpu",
                                "--no-first-run", "--disable-extensions", "--disable-background-networking"])
    context = browser.new_context(viewport={"width": spec["width"], "height": spec["height"]},
                                  service_workers="block")
    context.route("**/*", lambda route: route.fulfill(body=html, content_type="text/html; charset=utf-8")
                  if route.request.url == spec["url"] else route.abort())
    page = context.new_page()
    page.set_default_timeout(10000)
    def note(text):
        if len(verdict["console"]) < 20:
            verdict["console"].append(text[:300])
    page.on("console", lambda m: m.type == "error" and note("console.error: " + m.text))
    page.on("pageerror", lambda e: note("uncaught " + str(e)))
    page.goto(spec["url"], wait_until="load")
    page.wait_for_timeout(500)
    verdict["counts"] = page.evaluate(
        "sels => sels.map(s => { try { return document.querySelectorAll(s).length } catch (e) { return -1 } })",
        spec["selectors"])
    verdict["screenshot"] = base64.b64encode(page.screenshot(type="png")).decode()
    for script in spec["behaviour"]:
        try:
            value = page.evaluate("async () => await Promise.race([(async () => (" + script + "))(), "
                                  "new Promise((_, no) => setTimeout(() => no(new Error('no result in 3 s')), 3000))])")
            verdict["behaviour"].append([value is True, "" if value is True else "returned " + json.dumps(value)[:100]])
        except Exception as e:
            verdict["behaviour"].append([False, str(e).splitlines()[0][:200]])
    browser.close()
sys.stdout.write("\n@@frontend " + json.dumps(verdict) + "\n")
'''


def in_browser(page: Page, checks: list[Check]) -> dict[str, Any] | str:
    """Load the page in the sandboxed Chromium: console errors, element counts, behaviour results, screenshot; or
    why it could not be loaded."""
    from steps.sandbox import run_code
    spec = {"executable": browser_executable(), "width": SCREENSHOT[0], "height": SCREENSHOT[1], "url": PAGE_URL,
            "selectors": [c.elements[0] for c in checks if c.elements],
            "behaviour": [c.behaviour for c in checks if c.behaviour]}
    result = run_code("browser", {"page.html": page.html, "spec.json": json.dumps(spec), "check.py": BROWSER_CHECK},
                      ["check.py"], timeout_s=BROWSER_SECONDS, memory_mb=BROWSER_MEMORY_MB, output_cap=4 << 20)
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARK)]
    if not lines:
        if result.timed_out:
            return f"the page did not finish in the browser within {BROWSER_SECONDS:g} s"
        errors = [line for line in result.stderr.splitlines() if "Error" in line] or result.stderr.splitlines()
        return f"the browser check failed (exit {result.returncode}, {result.killed or 'no verdict'})" + (
            f": {clip(errors[-1])}" if errors else "")
    return json.loads(lines[-1][len(MARK):])


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
