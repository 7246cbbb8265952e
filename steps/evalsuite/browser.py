"""The frontend category's browser driver: finds the Chromium (``browser_executable``, ``browser_version``) and
loads a page in it inside the sandbox (``in_browser``, which runs the ``BROWSER_CHECK`` script with playwright): console
errors, element counts in the live DOM, behaviour results and a screenshot.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from typing import Any

from steps import settings
from steps.evalsuite.page_checks import Check
from steps.evalsuite.page_parse import Page
from steps.evalsuite.text import clip

BROWSER_SECONDS = 60.0
BROWSER_MEMORY_MB = 2048
SCREENSHOT = (1024, 768)
MARK = "@@frontend "
PAGE_URL = "http://page.invalid/"          # the page's origin in the browser (localStorage needs one); served from
                                           # the route, every other request aborted


@functools.cache
def browser_executable() -> str | None:
    """The Chromium to drive: ``MERGEFORGE_CHROMIUM``, else Debian's ``chromium`` (its binary, not the wrapper
    script), else one on PATH; None without one, or without playwright to drive it."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return None
    named = settings.chromium()
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
