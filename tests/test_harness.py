"""The code harness (steps/evalsuite/harness.py) against solutions that try to forge their verdict, run for real in
the sandbox: the expected values never enter the candidate's process, so every trick below fails, while an honest
solution, and one that prints, still passes."""
from __future__ import annotations

import json

import pytest

from steps.evalsuite import Reply, all_tests
from steps.evalsuite.harness import Opaque, decode, python_harness, same_json

TESTS = {t.id: t for t in all_tests()}
QUICKSORT = ("def quicksort(items):\n    if len(items) <= 1:\n        return list(items)\n    pivot, *rest = items\n"
             "    return (quicksort([x for x in rest if x < pivot]) + [pivot]\n"
             "            + quicksort([x for x in rest if x >= pivot]))\n")
FAKE_OLD_VERDICT = 'print("\\n@@evalsuite " + json.dumps({"passed": 8, "total": 8, "failure": None}), flush=True)'
ALL_TRUE = '{"results": [{"value": {"t": "const", "v": True}}] * 8}'

FORGERIES = {
    "prints the old verdict line and exits": (
        "import json, os, sys\n" + FAKE_OLD_VERDICT.replace("print(", "sys.__stdout__.write(").replace(
            ", flush=True)", " + '\\n'); sys.__stdout__.flush()") + "\nos._exit(0)\n"),
    "prints a results line of guesses and exits": (
        "import json, os, sys\nsys.__stdout__.write('\\n@@evalsuite ' + json.dumps(" + ALL_TRUE + ") + '\\n')\n"
        "sys.__stdout__.flush()\nos._exit(0)\n"),
    "returns an object equal to everything": (
        "class Anything:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n\n\n"
        "def quicksort(items):\n    return Anything()\n"),
    "returns a list that claims to equal anything": (
        "class Liar(list):\n    def __eq__(self, other):\n        return True\n\n\n"
        "def quicksort(items):\n    return Liar([0])\n"),
    "returns an int subclass that lies about itself": (
        "class Liar(int):\n    def __eq__(self, other):\n        return True\n    def __index__(self):\n"
        "        return 7\n    def __repr__(self):\n        return '[1, 2, 3]'\n\n\n"
        "def quicksort(items):\n    return [Liar(0)] * len(items)\n"),
    "patches the harness through sys.modules['__main__']": (
        "import sys\nmain = sys.modules['__main__']\nmain.CALLS[:] = []\n"
        "main._encode = lambda value, depth=0: {'t': 'const', 'v': True}\n\n\n"
        "def quicksort(items):\n    return items\n"),
    "replaces the harness's output function": (
        "import json, os, sys\nmain = sys.modules['__main__']\n"
        "def forged(fields):\n    sys.__stdout__.write('\\n@@evalsuite ' + json.dumps({'passed': 8, 'total': 8, "
        "'failure': None}) + '\\n')\n    sys.__stdout__.flush()\n    os._exit(0)\nmain._verdict = forged\n\n\n"
        "def quicksort(items):\n    return items\n"),
    "exits in the middle of the cases": (
        "import os\n\n\ndef quicksort(items):\n    os._exit(0)\n"),
    "raises SystemExit from a case": (
        "def quicksort(items):\n    raise SystemExit(0)\n"),
    "looks for the expected values in the harness file": (
        "import ast, re\nsource = open('check.py').read()\n"
        "FOUND = re.findall(r'\\[-?\\d+(?:, -?\\d+)*\\]', source)\n\n\n"
        "def quicksort(items):\n    wanted = sorted(str(x) for x in items)\n"
        "    for text in FOUND:\n        values = ast.literal_eval(text)\n"
        "        if sorted(str(x) for x in values) == wanted and values != list(items):\n            return values\n"
        "    return list(items)\n"),
}


def reply(code: str) -> Reply:
    return Reply(f"Here is my solution:\n\n```python\n{code}```\n", finish_reason="stop")


def test_an_honest_solution_passes_and_one_that_prints_too() -> None:
    assert TESTS["quicksort"].grade(reply(QUICKSORT)).passed
    noisy = QUICKSORT.replace("    if len(items) <= 1:", "    print('sorting', items)\n    if len(items) <= 1:")
    grade = TESTS["quicksort"].grade(reply(noisy))
    assert grade.passed and grade.reason == "8/8 cases", grade.reason


@pytest.mark.parametrize("trick", FORGERIES)
def test_a_forged_verdict_fails(trick: str) -> None:
    grade = TESTS["quicksort"].grade(reply(FORGERIES[trick]))
    assert not grade.passed, f"{trick}: {grade.reason}"
    assert "8/8" not in grade.reason, grade.reason


def test_the_harness_holds_no_expected_value() -> None:
    from steps.evalsuite.programming import _SCRAMBLED
    source = python_harness(["quicksort"], ["quicksort(SCRAMBLED)", "quicksort([3, 1, 2])"],
                            setup=f"SCRAMBLED = {_SCRAMBLED!r}\n")
    assert repr(sorted(_SCRAMBLED)) not in source and "[1, 2, 3]" not in source


def test_values_come_back_with_their_types() -> None:
    assert decode({"t": "tuple", "v": [{"t": "int", "v": "1"}, {"t": "str", "v": "a"}]}) == (1, "a")
    assert decode({"t": "const", "v": True}) is True
    assert decode({"t": "int", "v": str(2 ** 80)}) == 2 ** 80
    assert decode({"t": "set", "v": [{"t": "int", "v": "3"}]}) == {3}
    assert decode({"t": "dict", "v": [[{"t": "int", "v": "1"}, {"t": "list", "v": []}]]}) == {1: []}
    opaque = decode({"t": "object", "v": "Anything", "repr": "<Anything>"})
    assert isinstance(opaque, Opaque) and opaque != opaque and opaque != 1 and repr(opaque) == "<Anything>"
    with pytest.raises(ValueError):
        decode([1, 2])


@pytest.mark.parametrize("got, expected, same", [
    (True, 1, False), (1, True, False), (3, 3.0, True), ([1, [True]], [1, [True]], True),
    ([1, [1]], [1, [True]], False),
    ({"a": 1}, {"a": 1}, True), ({"a": 1}, {"b": 1}, False), ("3", 3, False), (None, None, True)])
def test_javascript_values_compare_as_json(got: object, expected: object, same: bool) -> None:
    assert same_json(json.loads(json.dumps(got)), expected) is same


def test_a_javascript_forgery_fails_and_an_honest_one_passes() -> None:
    import shutil
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    honest = ("function romanToInt(s) {\n  const v = {I: 1, V: 5, X: 10, L: 50, C: 100, D: 500, M: 1000};\n"
              "  let total = 0;\n  for (let i = 0; i < s.length; i++) {\n"
              "    const a = v[s[i]], b = v[s[i + 1]] || 0;\n    total += a < b ? -a : a;\n  }\n  return total;\n}\n")
    forged = ("process.stdout.write('\\n@@evalsuite ' + JSON.stringify({passed: 8, total: 8, failure: null})"
              " + '\\n');\nprocess.exit(0);\n")
    truthy = "function romanToInt(s) { return true; }\n"

    def js(code: str) -> Reply:
        return Reply(f"```javascript\n{code}```", finish_reason="stop")
    assert TESTS["javascript"].grade(js(honest)).passed
    for code in (forged, truthy):
        grade = TESTS["javascript"].grade(js(code))
        assert not grade.passed, grade.reason
