"""The frontend category: pages graded with html5lib, tinycss2 and tree-sitter, then loaded in Debian's Chromium
(playwright) inside the real sandbox. CI installs chromium (.ci/run), so there the browser tests must run; elsewhere
they are skipped when no Chromium is installed."""
from __future__ import annotations

import http.server
import os
import threading
import time
from collections.abc import Iterator

import pytest

from steps import sandbox
from steps.evalsuite import Reply, all_tests
from steps.evalsuite import frontend as F
from tests.frontend_pages import GOOD

TESTS = {t.id: t for t in all_tests(["frontend"])}
needs_browser = pytest.mark.skipif(F.browser_executable() is None and not os.environ.get("CI"),
                                   reason="no Chromium (apt-get install chromium); CI installs it")


def reply(html: str) -> Reply:
    return Reply(f"Here is the page:\n\n```html\n{html}```\n")


def grade(test_id: str, html: str):
    return TESTS[test_id].grade(reply(html))


def test_six_pages_in_their_own_category() -> None:
    assert sorted(TESTS) == sorted(GOOD)
    assert all(t.category == "frontend" for t in TESTS.values())
    assert not any(t.category == "frontend" for t in all_tests())      # optional: only when asked for


@needs_browser
@pytest.mark.parametrize("test_id", sorted(GOOD))
def test_a_page_meeting_every_requirement_passes_in_the_browser(test_id: str) -> None:
    result = grade(test_id, GOOD[test_id])
    assert result.passed, result.reason
    assert "not run" not in result.reason
    assert result.artifacts["screenshot.png"].startswith(b"\x89PNG\r\n\x1a\n")
    assert result.artifacts["page.html"] == GOOD[test_id].encode()


def _broken() -> list[tuple[str, str, str, str]]:
    """(test id, page, expected words in the reason, case name): each a good page broken one way."""
    w, p, a, s = GOOD["weather_dashboard"], GOOD["product_page"], GOOD["analytics_dashboard"], GOOD["snake_game"]
    r, lp = GOOD["registration_wizard"], GOOD["landing_page"]
    cases = [
        ("landing_page", lp.replace("nav.classList.toggle(\"scrolled\", window.scrollY > 50)", "null"),
         "nav gets `scrolled` on scroll", "nav never scrolled"),
        ("landing_page", lp.replace("const observer = new IntersectionObserver(", "const observer = new Watcher(")
         .replace("document.querySelectorAll(\".reveal\").forEach((el) => observer.observe(el));", ""),
         "IntersectionObserver", "no IntersectionObserver"),
        ("snake_game", s.replace("requestAnimationFrame(loop);\n}", "requestAnimationFrame(loop;\n}"),
         "JavaScript parses", "missing paren (the seed's failure)"),
        ("weather_dashboard", w.replace("gap: .5rem; margin-top: 1rem; }", "gap: .5rem; margin-top: 1rem;"),
         "CSS parses", "unclosed CSS block"),
        ("weather_dashboard", w.replace("color: var(--fg);", "color var(--fg);"), "CSS parses", "bad declaration"),
        ("weather_dashboard", w.replace("</section>\n<section id=\"forecast\">", "</div>\n<section id=\"forecast\">"),
         "HTML parses", "stray end tag"),
        ("weather_dashboard", w.replace("<div class=\"day card\">Fri", "<p>Fri"), "5-day forecast", "four days"),
        ("weather_dashboard", w.replace("<head>", "<head>\n<script src=\"https://cdn.example.com/x.js\"></script>"),
         "self-contained", "external script"),
        ("weather_dashboard", w.replace("let fahrenheit = false;", "let fahrenheit = false;\nundefinedThing();"),
         "no console errors", "exception at load"),
        ("weather_dashboard", w.replace("@media (prefers-color-scheme: dark)", "@media (min-width: 1px)"),
         "dark mode media query", "no dark mode"),
        ("product_page", p.replace("qty.value = Number(qty.value) + 1;", "qty.value = Number(qty.value) + 2;"),
         "quantity plus and minus", "plus adds two"),
        ("product_page", p.replace("panels.forEach((p, j) => { p.hidden = i !== j; })", "null"),
         "tabs switch panels", "tabs do nothing"),
        ("analytics_dashboard", a.replace("return ascending ? order : -order;", "return 0;"),
         "first header sorts by name", "sort does nothing"),
        ("registration_wizard", r.replace("p.length < 8 ? \"Weak\"", "p.length < 2 ? \"Weak\""),
         "strength meter says weak and strong", "weak password called medium"),
        ("registration_wizard", r.replace("<option>Texas</option>\n", ""), "all 50 states", "49 states"),
        ("snake_game", s.replace("document.addEventListener(\"keydown\"", "document.addEventListener(\"keyup\""),
         "keydown listener", "keyup instead of keydown"),
    ]
    return cases


@needs_browser
@pytest.mark.parametrize("test_id,page,words,name", _broken(), ids=[c[3] for c in _broken()])
def test_a_page_broken_one_way_fails_naming_the_check(test_id: str, page: str, words: str, name: str) -> None:
    assert page != GOOD[test_id], "the case must change the page"
    result = grade(test_id, page)
    assert not result.passed
    assert words in result.reason, result.reason


@pytest.mark.parametrize("text,why", [
    ("Sure! I would build it with React.", "no HTML document"),
    ("```python\nprint('<html>')\n```", "no HTML document"),
    ("", "no HTML document"),
])
def test_a_reply_without_a_page_fails(text: str, why: str) -> None:
    result = TESTS["snake_game"].grade(Reply(text))
    assert not result.passed and why in result.reason


def test_an_unlabelled_block_of_markup_is_graded_as_the_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(F, "browser_executable", lambda: None)
    result = TESTS["weather_dashboard"].grade(Reply("```\n<style> #forecast { width: 100px; }\n<script> <script>\n```"))
    assert not result.passed and "checks" in result.reason and "HTML parses" in result.reason, result.reason
    assert result.artifacts["page.html"].startswith(b"<style>")


def test_without_a_browser_the_structure_is_still_graded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(F, "browser_executable", lambda: None)
    good = grade("product_page", GOOD["product_page"])
    assert good.passed and "3 behaviour checks not run: no Chromium" in good.reason, good.reason
    assert "screenshot.png" not in good.artifacts
    bad = grade("product_page", GOOD["product_page"].replace('class="swatch"', 'class="chip"'))
    assert not bad.passed and "colour swatches" in bad.reason


def test_a_page_without_a_doctype_or_with_bad_markup_fails_html_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(F, "browser_executable", lambda: None)
    result = grade("weather_dashboard", GOOD["weather_dashboard"].replace("<!DOCTYPE html>\n", ""))
    assert not result.passed and "HTML parses" in result.reason and "doctype" in result.reason.lower()


def test_the_selector_engine_matches_the_browser_on_the_checks_selectors() -> None:
    page = F.Page.parse(GOOD["analytics_dashboard"])
    assert page.count("svg#bars rect") == 5
    assert page.count("table#data thead th") == 3
    assert page.count("table#data tbody tr") == 6
    assert page.count("svg#donut circle, svg#donut path") == 3
    assert page.count("#sidebar > #sidebar-toggle") == 1
    assert page.count("main > #sidebar-toggle") == 0
    assert F.Page.parse(GOOD["product_page"]).count("input#qty[type=number]") == 1


def test_javascript_features_come_from_the_syntax_tree() -> None:
    page = F.Page.parse(GOOD["snake_game"])
    assert page.js_calls("requestAnimationFrame") and page.js_calls("addEventListener", "keydown")
    assert not page.js_calls("addEventListener", "keyup")
    commented = F.Page.parse(GOOD["weather_dashboard"].replace(
        "let fahrenheit", "// requestAnimationFrame(x); new IntersectionObserver(y)\nlet fahrenheit"))
    assert not commented.js_calls("requestAnimationFrame") and not commented.js_new("IntersectionObserver")


# ------------------------------------------------------------------------------------------------ hostile pages

@pytest.fixture
def listener() -> Iterator[tuple[int, list[str]]]:
    """A web server on the host's loopback that records every request it gets."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], hits
    server.shutdown()


@needs_browser
@pytest.mark.parametrize("mode", ["bwrap", "rlimits"])
def test_a_page_cannot_reach_the_network(mode: str, listener: tuple[int, list[str]],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if mode not in sandbox.available_modes():
        pytest.skip(f"sandbox mode {mode} is not available here")
    monkeypatch.setattr(sandbox, "sandbox_mode", lambda: mode)
    port, hits = listener
    url = f"http://127.0.0.1:{port}"
    page = GOOD["weather_dashboard"].replace("let fahrenheit = false;", (
        f"let fahrenheit = false;\nfetch('{url}/fetch').catch(() => {{}});\n"
        f"new Image().src = '{url}/image';\nnavigator.sendBeacon('{url}/beacon', 'x');"))
    result = grade("weather_dashboard", page)
    time.sleep(0.5)
    assert hits == [], f"the page reached the host: {hits}"
    assert result.artifacts.get("screenshot.png"), result.reason     # it did load and run


@needs_browser
def test_a_page_that_never_stops_costs_one_failed_test() -> None:
    page = GOOD["snake_game"].replace("reset();\nrequestAnimationFrame(loop);", "while (true) {}")
    started = time.monotonic()
    result = grade("snake_game", page)
    assert not result.passed and "browser" in result.reason, result.reason
    assert time.monotonic() - started < F.BROWSER_SECONDS + 15
    assert not [p for p in sandbox.live_processes(lambda uid: uid >= sandbox.UID_BASE)]


@needs_browser
def test_a_page_that_floods_the_console_is_capped() -> None:
    page = GOOD["weather_dashboard"].replace("let fahrenheit = false;", (
        "let fahrenheit = false;\nfor (let i = 0; i < 20000; i++) console.error('x'.repeat(1000));"))
    result = grade("weather_dashboard", page)
    assert not result.passed and "no console errors" in result.reason, result.reason
    assert result.artifacts.get("screenshot.png")
