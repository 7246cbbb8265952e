"""Generated code against hidden cases, in the sandbox (``steps.sandbox.run_code``).

The solution is one file (``solution.py`` / ``solution.js``) next to a harness that loads it, calls its entry
points on each case under a per-case time limit, and prints one verdict line (``@@evalsuite {json}``) that the
grader reads back; what the solution itself prints is discarded.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from steps.evalsuite.core import Grade, fail
from steps.evalsuite.text import clip

MARK = "@@evalsuite "
PY = ("python", "py", "python3")
SANDBOX_SECONDS = 20.0


def sandbox(language: str, files: dict[str, str], argv: list[str], timeout_s: float = SANDBOX_SECONDS) -> Any:
    """``steps.sandbox.run_code`` (imported here, when code is first run)."""
    from steps.sandbox import run_code
    return run_code(language, files, argv, timeout_s=timeout_s)


PRELUDE = r'''
import io, json, os, signal, sys, traceback, types


def _verdict(fields):
    sys.__stdout__.write("\n@@evalsuite " + json.dumps(fields) + "\n")
    sys.__stdout__.flush()
    os._exit(0)


class _Discard(io.TextIOBase):
    def write(self, s):
        return len(s)


class _Slow(Exception):
    pass


def _alarm(signum, frame):
    raise _Slow()


def _limited(seconds, fn):
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _error(e, filename="solution.py"):
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == filename]
    if isinstance(e, SyntaxError) and e.filename == filename:
        lines = [e.lineno]
    where = f" ({filename} line {lines[-1]})" if lines else ""
    message = e.msg if isinstance(e, SyntaxError) else str(e)
    return f"{type(e).__name__}: {message}"[:300] + where


def _short(value):
    try:
        text = repr(value)
    except BaseException:
        text = f"<unprintable {type(value).__name__}>"
    return text if len(text) <= 160 else text[:160] + "..."
'''

_PY_MAIN = r'''

def _main():
    module = types.ModuleType("solution")
    module.__dict__.update({name: globals()[name] for name in PROVIDE})
    sys.modules["solution"] = module
    sys.stdout = _Discard()
    try:
        source = open("solution.py", encoding="utf-8").read()
        _limited(2 * CASE_SECONDS, lambda: exec(compile(source, "solution.py", "exec"), module.__dict__))
    except _Slow:
        return {"error": f"solution.py took longer than {2 * CASE_SECONDS:g} s to load"}
    except BaseException as e:
        return {"error": "solution.py failed to run: " + _error(e)}
    missing = [name for name in ENTRIES if not callable(module.__dict__.get(name))]
    if missing:
        defined = sorted(n for n, v in module.__dict__.items()
                         if callable(v) and not n.startswith("_") and n not in PROVIDE and not isinstance(v, type(sys)))
        return {"error": f"{', '.join(map(repr, missing))} not defined"
                         + (f" (solution.py defines {', '.join(defined)})" if defined else "")}
    scope = {**globals(), **{name: module.__dict__[name] for name in ENTRIES}}
    passed, failure = 0, None
    for call, expected in CASES:
        try:
            got = _limited(CASE_SECONDS, lambda: eval(call, scope))
        except _Slow:
            failure = failure or f"{call} took longer than {CASE_SECONDS:g} s"
            continue
        except BaseException as e:
            failure = failure or f"{call} raised {_error(e)}"
            continue
        try:
            good = bool(_check(got, expected))
        except Exception:
            good = False
        passed += good
        if not good:
            failure = failure or f"{call} returned {_short(got)}, expected {_short(expected)}"
    return {"passed": passed, "total": len(CASES), "failure": failure}


_verdict(_main())
'''


def python_harness(entries: Sequence[str], cases: Sequence[tuple[str, Any]], *, check: str = "got == expected",
                   setup: str = "", provide: Sequence[str] = (), case_seconds: float = 2.0) -> str:
    """A harness that calls ``entries`` of solution.py: each case is (call source, expected value as a literal);
    ``check`` is an expression of ``got`` and ``expected``; ``setup`` defines helpers the calls may use;
    ``provide`` names setup definitions handed to the solution before it loads (e.g. a node class)."""
    return (PRELUDE + setup + f"\n\ndef _check(got, expected):\n    return {check}\n\n"
            f"ENTRIES = {list(entries)!r}\nPROVIDE = {list(provide)!r}\nCASE_SECONDS = {case_seconds!r}\n"
            f"CASES = [\n" + "".join(f"    ({call!r}, {expected!r}),\n" for call, expected in cases) + "]\n"
            + _PY_MAIN)


def run_python(code: str, entries: Sequence[str], cases: Sequence[tuple[str, Any]], **harness: Any) -> Grade:
    """Run ``code`` as solution.py against the cases (see ``python_harness``)."""
    result = sandbox("python", {"solution.py": code, "check.py": python_harness(entries, cases, **harness)},
                     ["check.py"])
    return verdict(result)


_JS_HARNESS = r'''
const fs = require("fs");
const vm = require("vm");
const out = process.stdout;
function verdict(fields) { out.write("\n@@evalsuite " + JSON.stringify(fields) + "\n", () => process.exit(0)); }
function short(value) {
  let text;
  try { text = value === undefined ? "undefined" : JSON.stringify(value); } catch (e) { text = String(value); }
  return text.length <= 160 ? text : text.slice(0, 160) + "...";
}
function main() {
  const shim = { exports: {} };
  Object.assign(globalThis, { module: shim, exports: shim.exports, require });
  console.log = console.info = console.warn = console.error = () => {};
  let fn;
  try {
    vm.runInThisContext(fs.readFileSync("solution.js", "utf8"), { filename: "solution.js", timeout: 5000 });
    fn = vm.runInThisContext(`typeof ${ENTRY} === "function" ? ${ENTRY} : undefined`)
      ?? (typeof shim.exports === "function" ? shim.exports : shim.exports[ENTRY]);
  } catch (e) {
    const line = /solution\.js:(\d+)/.exec((e && e.stack) || "");
    return { error: `solution.js failed to run: ${e && e.name}: ${e && e.message}`.slice(0, 300)
                    + (line ? ` (solution.js line ${line[1]})` : "") };
  }
  if (typeof fn !== "function") return { error: `'${ENTRY}' not defined` };
  let passed = 0, failure = null;
  for (const [args, expected] of CASES) {
    const call = `${ENTRY}(${args.map((a) => JSON.stringify(a)).join(", ")})`;
    let got;
    try { got = fn(...args); } catch (e) {
      failure = failure ?? `${call} threw ${e && e.name}: ${e && e.message}`;
      continue;
    }
    if (JSON.stringify(got) === JSON.stringify(expected)) passed += 1;
    else failure = failure ?? `${call} returned ${short(got)}, expected ${short(expected)}`;
  }
  return { passed, total: CASES.length, failure };
}
verdict(main());
'''


def run_javascript(code: str, entry: str, cases: Sequence[tuple[list[Any], Any]]) -> Grade:
    """Run ``code`` as solution.js with node: ``entry(...args)`` must equal each expected value (as JSON)."""
    harness = f"const ENTRY = {json.dumps(entry)};\nconst CASES = {json.dumps([list(c) for c in cases])};\n"
    result = sandbox("javascript", {"solution.js": code, "check.js": harness + _JS_HARNESS}, ["check.js"])
    return verdict(result)


def verdict(result: Any) -> Grade:
    """The Grade from a harness run: its verdict line, or why there is none."""
    if result.timed_out:
        return fail("timed out")
    if result.killed:
        return fail(f"killed: {result.killed}")
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARK)]
    if not lines:
        errors = [line for line in result.stderr.splitlines() if "Error" in line] or result.stderr.splitlines()
        return fail(f"no verdict (exit {result.returncode})" + (f": {clip(errors[-1])}" if errors else ""))
    data = json.loads(lines[-1][len(MARK):])
    if "error" in data:
        return fail(data["error"])
    reason = f"{data['passed']}/{data['total']} cases"
    if data["failure"]:
        reason += f"; first failure: {data['failure']}"
    return Grade(data["passed"] == data["total"], reason)
