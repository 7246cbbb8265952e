"""agentic: a read -> diagnose -> fix chain and error recovery with scripted tool results, a plan, self-correction.

The scripted tools are fakes: pure functions of their arguments, so a conversation is a function of the model's
replies alone. Code the model writes is run in the sandbox against hidden cases.
"""
from __future__ import annotations

import re
from typing import Any

from steps.evalsuite.core import Grade, Reply, Script, Test, fail, ok, register
from steps.evalsuite.harness import PY, run_python
from steps.evalsuite.text import clip, code_block
from steps.evalsuite.tools import function

READ = function("read_file", "Read a text file of the repository.", {"path": {"type": "string"}}, ["path"])
WRITE = function("write_file", "Replace the content of a file of the repository.",
                 {"path": {"type": "string"}, "content": {"type": "string"}}, ["path", "content"])
LIST = function("list_files", "List the files of the repository.", {})

STATS_PY = '''"""Review statistics."""


def average_rating(ratings):
    """Mean of the ratings (1 to 5 stars), rounded to one decimal; 0.0 when there are none."""
    total = sum(ratings)
    return round(total / len(ratings), 1)


def rating_histogram(ratings):
    """How many ratings of each star value, 1 to 5."""
    return {star: ratings.count(star) for star in range(1, 6)}
'''
REPO = {"stats.py": STATS_PY,
        "test_stats.py": "from stats import average_rating\n\n\ndef test_empty():\n"
                         "    assert average_rating([]) == 0.0\n",
        "README.md": "# reviews\n\nStatistics over product reviews.\n"}


def _read_repo(args: dict[str, Any]) -> str:
    path = str(args.get("path", "")).removeprefix("./")
    return REPO.get(path, f"error: FileNotFoundError: no such file: {path!r}")


def _fix_chain(reply: Reply) -> Grade:
    calls = reply.all_calls()
    names = [(c.name, _path(c.arguments)) for c in calls]
    read = next((i for i, (name, path) in enumerate(names) if name == "read_file" and path == "stats.py"), None)
    # the file's final state is graded: the last write (a model that corrects its first write passes)
    write = next((i for i, (name, path) in reversed(list(enumerate(names)))
                  if name == "write_file" and path == "stats.py"), None)
    if read is None:
        return fail(f"never read stats.py (calls: {names})")
    if write is None:
        return fail(f"never wrote stats.py back (calls: {names})")
    if write < read:
        return fail("wrote stats.py before reading it")
    try:
        content = str(calls[write].args().get("content", ""))
    except ValueError as e:
        return fail(str(e))
    grade = run_python(content, ["average_rating", "rating_histogram"], [
        ("average_rating([])", 0.0), ("average_rating([4, 5])", 4.5), ("average_rating([1, 2, 2])", 1.7),
        ("average_rating([5])", 5.0),
        ("rating_histogram([1, 5, 5])", {1: 1, 2: 0, 3: 0, 4: 0, 5: 2})])
    return Grade(grade.passed, f"read, then wrote stats.py: {grade.reason}")


def _path(arguments: str) -> str:
    """The "path" argument of a call, read leniently (its JSON may be malformed)."""
    found = re.search(r'"path"\s*:\s*"(?:\./)?([^"]*)"', arguments)
    return found.group(1) if found else ""


register(Test("read_diagnose_fix", "agentic", [
    {"role": "system", "content": "You are a coding agent in a small Python repository. Use the tools to look at "
                                  "and change files. When you are done, summarize what you changed in one "
                                  "paragraph."},
    {"role": "user", "content": "The tests fail with `ZeroDivisionError: division by zero` in average_rating when a "
                                "product has no reviews yet. Find the cause and fix the file."}],
    _fix_chain, tools=[LIST, READ, WRITE], max_tokens=1024,
    script=Script({"list_files": lambda args: "\n".join(REPO), "read_file": _read_repo,
                   "write_file": lambda args: f"wrote {len(str(args.get('content', '')))} characters to "
                                              f"{args.get('path')}"}, max_turns=8)))

SETTINGS = "service: payments\nlisten:\n  host: 0.0.0.0\n  port: 8443\nmetrics:\n  port: 9102\n"


def _read_settings(args: dict[str, Any]) -> str:
    path = str(args.get("path", "")).removeprefix("./")
    if path == "settings.yaml":
        return SETTINGS
    return f"error: FileNotFoundError: no such file: {path!r}. Files here: README.md, app.py, settings.yaml"


def _recovered(reply: Reply) -> Grade:
    paths = [_path(c.arguments) for c in reply.all_calls() if c.name == "read_file"]
    if "settings.yaml" not in paths:
        return fail(f"never read settings.yaml after the error (read: {paths})")
    if not re.search(r"(?<!\d)8443(?!\d)", reply.text):
        return fail(f"final answer lacks port 8443: {clip(reply.text)!r}")
    return ok(f"recovered from the missing file (read {paths}) and answered 8443")


register(Test("error_recovery", "agentic", [
    {"role": "system", "content": "You are an assistant with read access to a service's files through read_file."},
    {"role": "user", "content": "Which TCP port does the payment service listen on? It is set in settings.yml."}],
    _recovered, tools=[READ], max_tokens=512, script=Script({"read_file": _read_settings}, max_turns=5)))


def _plan(reply: Reply) -> Grade:
    steps = re.findall(r"(?m)^\s*(?:\*\*)?(\d+)[.)]\s+(.+)$", reply.text)
    if not 4 <= len(steps) <= 8:
        return fail(f"{len(steps)} numbered steps, expected 4 to 8: {clip(reply.text)!r}")
    if [int(n) for n, _ in steps] != list(range(1, len(steps) + 1)):
        return fail(f"steps numbered {[int(n) for n, _ in steps]}, not 1..{len(steps)}")
    texts = [s.lower() for _, s in steps]

    def first(*words: str) -> int | None:
        return next((i for i, s in enumerate(texts) if any(w in s for w in words)), None)
    backup = first("backup", "back up", "snapshot", "pg_dump", "dump")
    switch = first("switch", "cut over", "cutover", "point the app", "repoint", "redirect", "connection string",
                   "update the application")
    verify = first("test", "verify", "validat", "check")
    if backup is None or switch is None or verify is None:
        missing = [n for n, i in (("backup", backup), ("switch-over", switch), ("verification", verify)) if i is None]
        return fail(f"no {', '.join(missing)} step")
    if backup > switch:
        return fail(f"switches over (step {switch + 1}) before the backup (step {backup + 1})")
    return ok(f"{len(steps)} steps: backup at {backup + 1}, verification, switch-over at {switch + 1}")


register(Test("plan", "agentic", [{"role": "user", "content": (
    "Our web application's PostgreSQL 14 database must move to PostgreSQL 16 on a new server with at most a few "
    "minutes of downtime. Write the plan as a numbered list of 4 to 8 steps, one line each, in the order to do "
    "them. No code.")}], _plan, max_tokens=512))

RUN = function("run_python", "Run a Python program and return what it prints.", {"code": {"type": "string"}},
               ["code"])


def _corrected(reply: Reply) -> Grade:
    runs = [c for c in reply.calls() if c.name == "run_python"]
    code = code_block(reply.text, PY)
    if code is None and runs:
        try:
            code = str(runs[-1].args().get("code", ""))
        except ValueError as e:
            return fail(str(e))
    if code is None:
        return fail("no corrected code (no fenced code block, no run_python call)")
    return run_python(code, ["median"], [
        ("median([3, 1, 2])", 2), ("median([4, 1, 3, 2])", 2.5), ("median([5])", 5), ("median([1, 2])", 1.5),
        ("median([7, 7, 1, 9, 3, 3])", 5.0), ("median([-1.5, 0.5, 10.0])", 0.5)])


register(Test("self_correction", "agentic", [
    {"role": "system", "content": "You are a careful programming assistant. run_python runs Python code."},
    {"role": "user", "content": "Write a Python function median(values) that returns the median of a non-empty "
                                "list of numbers, and try it on [3, 1, 2] and [4, 1, 3, 2]."},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "run_python", "arguments": '{"code": "def median(values):\\n    s = sorted(values)\\n    return '
                                           's[len(s) // 2]\\n\\nprint(median([3, 1, 2]), median([4, 1, 3, 2]))"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "2 3"},
    {"role": "user", "content": "Is that output right? If not, fix median and give me the final function in a "
                                "fenced python code block."}],
    _corrected, tools=[RUN], max_tokens=768))
