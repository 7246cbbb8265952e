"""Generated code against hidden cases, in the sandbox (``steps.sandbox.run_code``).

The solution is one file (``solution.py`` / ``solution.js``) next to a harness that loads it, calls its entry
points on each case under a per-case time limit, and prints one line (``@@evalsuite {json}``) with what each call
returned, encoded with its type; what the solution itself prints is discarded. The expected values never enter that
process: the grader (this module, in the parent) decodes the values and compares them. A solution that prints a
forged line, exits early or patches the harness through ``sys.modules['__main__']`` can at most report values, and
only right values pass; an object that claims to equal anything (``__eq__`` always true) comes back as an opaque
object that equals nothing.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
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


def _encode(value, depth=0):
    """A value as JSON with its type, read through the base types' own methods (a subclass that overrides them to
    lie is read as what it holds); anything else as an opaque object the grader compares equal to nothing."""
    if depth > 100:
        raise ValueError("nested more than 100 levels deep")
    if value is None or value is True or value is False:
        return {"t": "const", "v": value}
    if isinstance(value, int):
        return {"t": "int", "v": str(int.__index__(value))}
    if isinstance(value, float):
        return {"t": "float", "v": float.__repr__(value)}
    if isinstance(value, str):
        return {"t": "str", "v": str.__str__(value)}
    if isinstance(value, bytes):
        return {"t": "bytes", "v": bytes.hex(value)}
    for kind in (list, tuple, set, frozenset):
        if isinstance(value, kind):
            return {"t": kind.__name__, "v": [_encode(x, depth + 1) for x in kind.__iter__(value)]}
    if isinstance(value, dict):
        return {"t": "dict", "v": [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in dict.items(value)]}
    return {"t": "object", "v": type(value).__name__, "repr": _short(value)}
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
    results = []
    for call in CALLS:
        try:
            got = _limited(CASE_SECONDS, lambda: eval(call, scope))
            results.append({"value": _limited(CASE_SECONDS, lambda: _encode(got))})
        except _Slow:
            results.append({"slow": CASE_SECONDS})
        except BaseException as e:
            results.append({"raised": _error(e)})
    return {"results": results}


_verdict(_main())
'''


def python_harness(entries: Sequence[str], calls: Sequence[str], *, setup: str = "", provide: Sequence[str] = (),
                   case_seconds: float = 2.0) -> str:
    """A harness that calls ``entries`` of solution.py: each call is Python source; ``setup`` defines helpers the
    calls may use; ``provide`` names setup definitions handed to the solution before it loads (e.g. a node class).
    It holds no expected value."""
    return (PRELUDE + setup + f"\n\nENTRIES = {list(entries)!r}\nPROVIDE = {list(provide)!r}\n"
            f"CASE_SECONDS = {case_seconds!r}\nCALLS = [\n" + "".join(f"    {call!r},\n" for call in calls) + "]\n"
            + _PY_MAIN)


def equal(got: Any, expected: Any) -> bool:
    return bool(got == expected)


def run_python(code: str, entries: Sequence[str], cases: Sequence[tuple[str, Any]], *,
               check: Callable[[Any, Any], bool] = equal, **harness: Any) -> Grade:
    """Run ``code`` as solution.py against the cases, each (call source, expected value); ``check(got, expected)``
    compares, here, what the call returned with the expected value (default ``got == expected``)."""
    result = sandbox("python", {"solution.py": code,
                                "check.py": python_harness(entries, [call for call, _ in cases], **harness)},
                     ["check.py"])
    return compared(result, [(call, expected, _python_value) for call, expected in cases], check)


class Opaque:
    """A value the harness could not read as data (an object of the solution's own class): it equals nothing."""

    def __init__(self, kind: str, text: str) -> None:
        self.kind, self.text = kind, text

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return self.text


def decode(data: Any) -> Any:
    """A value as the Python harness encoded it (see PRELUDE's _encode)."""
    if not isinstance(data, dict) or "t" not in data:
        raise ValueError(f"not an encoded value: {str(data)[:80]}")
    kind, value = data["t"], data.get("v")
    if kind == "const" and value in (None, True, False):
        return value
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "str":
        return str(value)
    if kind == "bytes":
        return bytes.fromhex(value)
    if kind in ("list", "tuple", "set", "frozenset"):
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[kind](decode(x) for x in value)
    if kind == "dict":
        return {decode(k): decode(v) for k, v in value}
    return Opaque(str(value), str(data.get("repr", f"<{value}>")))


def _python_value(entry: dict[str, Any]) -> Any:
    return decode(entry["value"])


def _json_value(entry: dict[str, Any]) -> Any:
    return json.loads(entry["value"]) if "value" in entry else Opaque("undefined", "undefined")


def short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<unprintable {type(value).__name__}>"
    return text if len(text) <= 160 else text[:160] + "..."


def compared(result: Any, cases: Sequence[tuple[str, Any, Callable[[dict[str, Any]], Any]]],
             check: Callable[[Any, Any], bool]) -> Grade:
    """The Grade from a harness run: each case's returned value (read by its reader) compared with its expected
    value here, in the grader; or why the run gave no values."""
    data = reported(result)
    if isinstance(data, Grade):
        return data
    results = data.get("results")
    if not isinstance(results, list) or len(results) != len(cases):
        return fail(f"the harness reported {len(results) if isinstance(results, list) else 'no'} results for "
                    f"{len(cases)} cases")
    passed, failure = 0, None
    for (call, expected, read), entry in zip(cases, results, strict=True):
        if not isinstance(entry, dict):
            failure = failure or f"{call}: no result"
        elif "slow" in entry:
            seconds = entry["slow"]
            limit = f"{seconds:g} s" if isinstance(seconds, (int, float)) else "its time limit"
            failure = failure or f"{call} took longer than {limit}"
        elif "raised" in entry:
            failure = failure or f"{call} raised {entry['raised']}"
        else:
            try:
                got = read(entry)
            except (ValueError, TypeError, KeyError, OverflowError) as exc:
                failure = failure or f"{call}: its value could not be read back ({exc})"
                continue
            try:
                good = bool(check(got, expected))
            except Exception:
                good = False
            passed += good
            if not good:
                failure = failure or f"{call} returned {short(got)}, expected {short(expected)}"
    reason = f"{passed}/{len(cases)} cases" + (f"; first failure: {failure}" if failure else "")
    return Grade(passed == len(cases), reason)


_JS_HARNESS = r'''
const fs = require("fs");
const vm = require("vm");
const out = process.stdout;
function verdict(fields) { out.write("\n@@evalsuite " + JSON.stringify(fields) + "\n", () => process.exit(0)); }
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
  const results = [];
  for (const args of CASES) {
    try {
      const got = fn(...args);
      const text = JSON.stringify(got);
      results.push(text === undefined ? {} : { value: String(text) });
    } catch (e) {
      results.push({ raised: `${e && e.name}: ${e && e.message}`.slice(0, 300) });
    }
  }
  return { results };
}
verdict(main());
'''


def run_javascript(code: str, entry: str, cases: Sequence[tuple[list[Any], Any]]) -> Grade:
    """Run ``code`` as solution.js with node: ``entry(...args)`` must equal each expected value, compared here as
    JSON values (a number is not a boolean)."""
    harness = f"const ENTRY = {json.dumps(entry)};\nconst CASES = {json.dumps([list(args) for args, _ in cases])};\n"
    result = sandbox("javascript", {"solution.js": code, "check.js": harness + _JS_HARNESS}, ["check.js"])
    calls = [f"{entry}({', '.join(json.dumps(a) for a in args)})" for args, _ in cases]
    return compared(result, [(call, expected, _json_value) for call, (_, expected) in zip(calls, cases, strict=True)],
                    same_json)


def same_json(got: Any, expected: Any) -> bool:
    """Equal as JSON values: a boolean is not a number, 3 and 3.0 are one number."""
    if isinstance(got, bool) or isinstance(expected, bool):
        return type(got) is type(expected) and got == expected
    if isinstance(got, (int, float)) and isinstance(expected, (int, float)):
        return bool(got == expected)
    if isinstance(got, list) and isinstance(expected, list):
        return len(got) == len(expected) and all(same_json(a, b) for a, b in zip(got, expected, strict=True))
    if isinstance(got, dict) and isinstance(expected, dict):
        return got.keys() == expected.keys() and all(same_json(got[k], expected[k]) for k in got)
    return type(got) is type(expected) and got == expected


def reported(result: Any) -> dict[str, Any] | Grade:
    """What a harness reported on its line (the last one with the mark), or a failing Grade saying why there is
    none."""
    if result.timed_out:
        return fail("timed out")
    if result.killed:
        return fail(f"killed: {result.killed}")
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARK)]
    if not lines:
        errors = [line for line in result.stderr.splitlines() if "Error" in line] or result.stderr.splitlines()
        return fail(f"no verdict (exit {result.returncode})" + (f": {clip(errors[-1])}" if errors else ""))
    try:
        data = json.loads(lines[-1][len(MARK):])
    except ValueError:
        return fail("the harness's line is not JSON")
    if not isinstance(data, dict):
        return fail("the harness's line is not a JSON object")
    if "error" in data:
        return fail(str(data["error"]))
    return data
