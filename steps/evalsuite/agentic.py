"""agentic: a read -> diagnose -> fix chain and error recovery with scripted tool results, a plan, self-correction.

The scripted tools are fakes: pure functions of their arguments, so a conversation is a function of the model's
replies alone. Code the model writes is run in the sandbox against hidden cases.
"""
from __future__ import annotations

import re
from typing import Any

from steps.evalsuite.core import Grade, Reply, Script, Test, ToolCall, fail, ok, register
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


def _read_outcome(call: ToolCall) -> str:
    """What the script answered a read_file call: "content" (settings.yaml), "missing" (the scripted error,
    naming the files that are there) or "bad" (arguments that are not a JSON object)."""
    try:
        args = call.args()
    except ValueError:
        return "bad"
    return "content" if _read_settings(args) == SETTINGS else "missing"


def _recovered(reply: Reply) -> Grade:
    """Reads settings.yml, the file the question names, gets the scripted error, then reads settings.yaml (which
    the error lists) and answers 8443 from it."""
    reads = [(_path(c.arguments), _read_outcome(c)) for c in reply.all_calls() if c.name == "read_file"]
    if not reads:
        return fail(f"never called read_file: answered without reading the settings: {clip(reply.text)!r}")
    first_content = next((i for i, (_, outcome) in enumerate(reads) if outcome == "content"), None)
    if first_content is None:
        return fail(f"never read settings.yaml after the error (read: {[p for p, _ in reads]})")
    if not any(outcome == "missing" for _, outcome in reads[:first_content]):
        return fail(f"read settings.yaml straight away (read: {[p for p, _ in reads]}): never tried settings.yml, "
                    "the file the question names, so never met the error to recover from")
    if not re.search(r"(?<!\d)8443(?!\d)", reply.text):
        return fail(f"final answer lacks port 8443: {clip(reply.text)!r}")
    return ok(f"hit the missing file, recovered (read {[p for p, _ in reads]}) and answered 8443")


register(Test("error_recovery", "agentic", [
    {"role": "system", "content": "You are an assistant with read access to a service's files through read_file."},
    {"role": "user", "content": "Which TCP port does the payment service listen on? It is set in settings.yml: "
                                "read that file to find out."}],
    _recovered, tools=[READ], max_tokens=512, script=Script({"read_file": _read_settings}, max_turns=5)))


_STEP = re.compile(r"^\s*(?:#{1,6}\s*)?(?:[-*+]\s+)?(?:\*\*|__)?(?:step\s*)?(\d{1,2})\s*(?:[.):]|\s[-\u2013\u2014])"
                   r"(?:\*\*|__)?\s*(.+)$", re.I)
# the stages a migration plan needs, each found by a few phrases (matched at word starts, in lowercase)
_STAGES = {
    "backup": ("backup", "back up", "back-up", "snapshot", "pg_dump", "pg_basebackup", "dump"),
    "rehearsal": ("staging", "rehears", "dry run", "dry-run", "trial", "test environment", "test instance",
                  "test server", "test copy", "test migration", "test upgrade", "on a copy", "against a copy",
                  "on a clone", "restored copy", "non-production", "pre-production", "preprod", "sandbox",
                  "practice"),
    "migration": ("migrat", "replicat", "pg_upgrade", "upgrade", "restore", "transfer", "copy the data",
                  "copy data", "move the data", "sync", "load"),
    "rollback plan": ("rollback", "roll back", "roll-back", "fallback", "fall back", "fall-back", "revert",
                      "back out", "keep the old", "abort"),
    "cutover": ("switch", "cut over", "cutover", "cut-over", "point the app", "repoint", "re-point", "redirect",
                "connection string", "promote", "go live", "go-live", "failover", "fail over", "dns"),
    "verification": ("verif", "validat", "check", "smoke", "monitor", "confirm", "test", "compare", "row count",
                     "watch"),
}
_STAGE_RE = {stage: re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + ")") for stage, words in _STAGES.items()}


def _first_match(stage: str, line: str) -> int | None:
    found = _STAGE_RE[stage].search(line)
    return found.start() if found else None


def _plan_steps(text: str) -> list[str] | Grade:
    """The plan's steps, in order, as lowercase lines without markdown; the failing Grade when they are not a
    numbered list of 4 to 8 one-line steps numbered 1..n (a heading line between them is allowed)."""
    lines = [line for line in text.splitlines() if line.strip()]
    matches = [_STEP.match(line) for line in lines]
    steps = [(i, m) for i, m in enumerate(matches) if m is not None]
    if not steps:
        return fail(f"no numbered list (1. / 1) / Step 1:), expected 4 to 8 numbered steps: {clip(text)!r}")
    if not 4 <= len(steps) <= 8:
        return fail(f"{len(steps)} numbered steps, expected 4 to 8: {clip(text)!r}")
    if [int(m.group(1)) for _, m in steps] != list(range(1, len(steps) + 1)):
        return fail(f"steps numbered {[int(m.group(1)) for _, m in steps]}, not 1..{len(steps)}")
    first, last = steps[0][0], steps[-1][0]
    over = [(i, lines[i]) for i in range(first, last + 1)
            if matches[i] is None and not re.fullmatch(r"\s*(?:#+\s.*|\*\*[^*]+\*\*:?)\s*", lines[i])]
    if over:
        step = max(int(m.group(1)) for i, m in steps if i < over[0][0])
        return fail(f"step {step} takes more than one line ({clip(over[0][1], 60)!r})")
    return [re.sub(r"[*`]|\b_|_\b", "", m.group(2)).lower() for _, m in steps]   # pg_dump keeps its _


_ORDER = (("backup", "migration", True), ("rehearsal", "cutover", True), ("migration", "cutover", False),
          ("rollback plan", "cutover", False))   # (stage, a later stage, whether it must be a later step)


def _cutover_at(line: str) -> int | None:
    """Where a line switches over: a rollback step's "switch back" is no cutover."""
    at, back = _first_match("cutover", line), _first_match("rollback plan", line)
    return at if at is not None and (back is None or at < back) else None


def _plan(reply: Reply) -> Grade:
    """A numbered list whose stages come in a safe order: a backup before the migration, a rehearsal (staging, a
    copy) and a rollback plan before the cutover, which comes no earlier than the migration, and a verification
    after the cutover."""
    steps = _plan_steps(reply.text)
    if isinstance(steps, Grade):
        return steps
    found = {stage: next((i for i, s in enumerate(steps) if _first_match(stage, s) is not None), None)
             for stage in ("backup", "rehearsal", "rollback plan")}
    found["migration"] = next((i for i, s in enumerate(steps) if _first_match("migration", s) is not None and all(
        _first_match(other, s) is None for other in ("backup", "rehearsal"))), None)   # not "test the restore"
    found["cutover"] = next((i for i, s in enumerate(steps) if _cutover_at(s) is not None), None)
    at = {stage: i for stage, i in found.items() if i is not None}
    if missing := [stage for stage in found if stage not in at]:
        return fail(f"no {', no '.join(missing)} step ({len(steps)} steps: {clip(' / '.join(steps), 200)!r})")
    for before, after, strictly in _ORDER:
        if at[before] > at[after] or (strictly and at[before] == at[after]):
            return fail(f"the {after} (step {at[after] + 1}) comes before the {before} (step {at[before] + 1})")
    cutover, switched = at["cutover"], _cutover_at(steps[at["cutover"]]) or 0
    if not any(_first_match("verification", s) is not None for s in steps[cutover + 1:]) and not any(
            m.start() > switched for m in _STAGE_RE["verification"].finditer(steps[cutover])):
        return fail(f"no verification after the cutover (step {cutover + 1})")
    return ok(f"{len(steps)} steps in a safe order: " + ", ".join(f"{stage} {i + 1}" for stage, i in sorted(
        at.items(), key=lambda item: item[1])) + ", then verification")


register(Test("plan", "agentic", [{"role": "user", "content": (
    "Our web application's PostgreSQL 14 database must move to PostgreSQL 16 on a new server with at most a few "
    "minutes of downtime. It must be safe: no data may be lost whatever fails, nothing may be done on production "
    "that was not tried first, and we must be able to go back. Write the plan as a numbered list of 4 to 8 steps, "
    "one line each, in the order to do them. No code.")}], _plan, max_tokens=512))

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
