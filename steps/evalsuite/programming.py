"""programming: 15 tasks whose code is run in the sandbox against hidden cases (Python, one JavaScript function
run with node, one SQL query run on a sqlite3 database, one generated pytest file run with pytest)."""
from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence
from typing import Any

from steps.evalsuite.core import Grade, Reply, Test, fail, ok, register
from steps.evalsuite.harness import PRELUDE, PY, decode, reported, run_javascript, run_python, sandbox, short
from steps.evalsuite.text import clip, code_block, code_blocks

FENCE = "\n\nReply with the complete code in one fenced ```{} code block."
NO_FENCE = "no fenced code block"
Static = Callable[[ast.Module], str | None]  # a reason to fail, from the parsed code


def _code(reply: Reply, languages: tuple[str, ...] = PY) -> str | None:
    return code_block(reply.text, languages)


def defining(reply: Reply, names: Sequence[str]) -> str | None:
    """The first fenced Python block that defines every one of ``names`` at its top level (a reply may quote the
    buggy line or show a usage example in a block of its own first), else the first Python block."""
    for lang, code in code_blocks(reply.text):
        if lang not in (*PY, ""):
            continue
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        if set(names) <= defined:
            return code
    return _code(reply)


def python_task(id: str, prompt: str, entries: Sequence[str], cases: Sequence[tuple[str, Any]], *,
                static: Static | None = None, max_tokens: int = 1024, **harness: Any) -> Test:
    """A Python task: the python block that defines ``entries`` must pass every hidden case."""
    def grade(reply: Reply) -> Grade:
        code = defining(reply, entries)
        if code is None:
            return fail(NO_FENCE)
        if static is not None:
            try:
                reason = static(ast.parse(code))
            except SyntaxError:
                reason = None  # the harness reports it, with its line
            if reason:
                return fail(reason)
        return run_python(code, entries, cases, **harness)
    return register(Test(id, "programming", [{"role": "user", "content": prompt + FENCE.format("python")}], grade,
                         max_tokens=max_tokens))


def _calls(tree: ast.AST, name: str) -> bool:
    """Whether the code calls ``name`` (a function or a method)."""
    return any(isinstance(n, ast.Call) and (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None)
                                            == name) for n in ast.walk(tree))


def _definitions(tree: ast.Module) -> list[ast.AST]:
    """The solution's own definitions: its top-level functions and classes, not the self-tests a careful answer
    adds (``test_*`` functions, module-level asserts, an ``if __name__ == "__main__":`` block)."""
    return [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and not node.name.startswith(("test", "_test"))]


def _no_builtin_sort(tree: ast.Module) -> str | None:
    used = any(_calls(node, "sorted") or _calls(node, "sort") for node in _definitions(tree))
    return "calls sorted() or .sort() instead of implementing quicksort" if used else None


_SCRAMBLED = [(31 * i * i + 7 * i) % 997 - 498 for i in range(300)]  # arithmetic: the same on every Python
python_task("quicksort", (
    "Write a Python function `quicksort(items)` that returns a new list with the integers of `items` in ascending "
    "order, using the quicksort algorithm. Do not call sorted() or list.sort(), and do not modify `items`."),
    ["quicksort"],
    [("quicksort([])", []), ("quicksort([1])", [1]), ("quicksort([3, 1, 2])", [1, 2, 3]),
     ("quicksort([5, -2, 5, 0, -2])", [-2, -2, 0, 5, 5]), ("quicksort(list(range(60)))", list(range(60))),
     ("quicksort(list(range(60, 0, -1)))", list(range(1, 61))), ("quicksort(SCRAMBLED)", sorted(_SCRAMBLED)),
     ("unchanged(quicksort, [3, 1, 2])", True)],
    static=_no_builtin_sort,
    setup=f"SCRAMBLED = {_SCRAMBLED!r}\n\n\ndef unchanged(f, items):\n    before = list(items)\n    f(items)\n"
          f"    return items == before\n")

python_task("two_sum", (
    "Write a Python function `two_sum(nums, target)` that returns `[i, j]` with `i < j`, the indices of the two "
    "numbers in `nums` that add up to `target`. Exactly one such pair exists. It must run in O(n) time."),
    ["two_sum"],
    [("two_sum([2, 7, 11, 15], 9)", [0, 1]), ("two_sum([3, 2, 4], 6)", [1, 2]), ("two_sum([3, 3], 6)", [0, 1]),
     ("two_sum([-3, 4, 3, 90], 0)", [0, 2]), ("two_sum([1, 5, 9, 13, -4], 9)", [3, 4]),
     ("two_sum(EVENS_AND_ONE, 79999)", [39999, 40000])],
    check=lambda got, expected: list(got) == expected,
    setup="EVENS_AND_ONE = list(range(0, 80000, 2)) + [1]  # one odd sum: 79998 + 1\n")

python_task("balanced_brackets", (
    "Write a Python function `is_balanced(text)` that returns True when every (, [ and { in `text` is closed by "
    "the matching bracket in the right order, and False otherwise. Other characters are ignored."),
    ["is_balanced"],
    [("is_balanced('')", True), ("is_balanced('()')", True), ("is_balanced('([]{})')", True),
     ("is_balanced('(]')", False), ("is_balanced('((')", False), ("is_balanced('}{')", False),
     ("is_balanced('a(b[c]d)e')", True), ("is_balanced('([)]')", False), ("is_balanced('{[()()]}x')", True),
     ("is_balanced('())')", False), ("is_balanced('(' * 3000 + ')' * 3000)", True)],
    check=lambda got, expected: got is expected)

python_task("longest_substring", (
    "Write a Python function `length_of_longest_substring(s)` that returns the length of the longest substring of "
    "`s` without repeating characters, in linear time."),
    ["length_of_longest_substring"],
    [("length_of_longest_substring('')", 0), ("length_of_longest_substring('abcabcbb')", 3),
     ("length_of_longest_substring('bbbbb')", 1), ("length_of_longest_substring('pwwkew')", 3),
     ("length_of_longest_substring('dvdf')", 3), ("length_of_longest_substring('abba')", 2),
     ("length_of_longest_substring(' ')", 1), ("length_of_longest_substring('tmmzuxt')", 5),
     ("length_of_longest_substring('abcdefghijklmnopqrstuvwxyz' * 2000)", 26)])

python_task("climbing_stairs", (
    "Write a Python function `climb_stairs(n)` that returns the number of distinct ways to climb a staircase of "
    "`n` steps (n >= 1) taking 1 or 2 steps at a time. Use dynamic programming; n can be 90."),
    ["climb_stairs"],
    [("climb_stairs(1)", 1), ("climb_stairs(2)", 2), ("climb_stairs(3)", 3), ("climb_stairs(5)", 8),
     ("climb_stairs(10)", 89), ("climb_stairs(35)", 14930352), ("climb_stairs(90)", 4660046610375530309)])

_REPLAY = '''
def replay(cls, capacity, ops):
    """Apply ("put", key, value) and ("get", key) to a new cache; the values the gets returned."""
    cache, out = cls(capacity), []
    for op in ops:
        if op[0] == "put":
            cache.put(op[1], op[2])
        else:
            out.append(cache.get(op[1]))
    return out
'''
python_task("lru_cache", (
    "Write a Python class `LRUCache` with `__init__(self, capacity)`, `get(self, key)` returning the value or -1 "
    "when the key is absent, and `put(self, key, value)`, which inserts or updates and, when the cache is over "
    "capacity, evicts the least recently used key (both get and put count as a use). get and put must be O(1)."),
    ["LRUCache"],
    [("replay(LRUCache, 2, [('put', 1, 1), ('put', 2, 2), ('get', 1), ('put', 3, 3), ('get', 2), ('put', 4, 4), "
      "('get', 1), ('get', 3), ('get', 4)])", [1, -1, -1, 3, 4]),
     ("replay(LRUCache, 2, [('put', 1, 1), ('put', 2, 2), ('put', 1, 10), ('put', 3, 3), ('get', 1), ('get', 2), "
      "('get', 3)])", [10, -1, 3]),
     ("replay(LRUCache, 1, [('put', 1, 1), ('put', 2, 2), ('get', 1), ('get', 2)])", [-1, 2]),
     ("replay(LRUCache, 2, [('put', 1, 1), ('put', 2, 2), ('get', 1), ('put', 3, 3), ('get', 1), ('get', 2)])",
      [1, 1, -1]),
     ("replay(LRUCache, 3, [('get', 7)])", [-1])],
    setup=_REPLAY)

_TREE = '''
class TreeNode:
    def __init__(self, val, left=None, right=None):
        self.val = val
        self.left = left
        self.right = right


def tree(spec):
    """A tree from nested (value, left, right) tuples; None is an empty tree."""
    return None if spec is None else TreeNode(spec[0], tree(spec[1]), tree(spec[2]))
'''
python_task("inorder_traversal", (
    "Given\n\n```python\nclass TreeNode:\n    def __init__(self, val, left=None, right=None):\n"
    "        self.val = val\n        self.left = left\n        self.right = right\n```\n\n"
    "write a Python function `inorder(root)` that returns the list of the tree's values in in-order (left subtree, "
    "node, right subtree). `root` may be None."),
    ["inorder"],
    [("inorder(None)", []), ("inorder(tree((1, None, None)))", [1]),
     ("inorder(tree((1, None, (2, (3, None, None), None))))", [1, 3, 2]),
     ("inorder(tree((4, (2, (1, None, None), (3, None, None)), (6, (5, None, None), (7, None, None)))))",
      [1, 2, 3, 4, 5, 6, 7]),
     ("inorder(tree((5, (4, (3, (2, (1, None, None), None), None), None), None)))", [1, 2, 3, 4, 5]),
     ("inorder(tree(('b', ('a', None, None), ('c', None, None))))", ["a", "b", "c"])],
    setup=_TREE, provide=["TreeNode"])

_GRAPHS = '''
G1 = {"A": ["B", "C"], "B": ["D"], "C": ["E"], "D": ["E", "F"], "E": ["G"], "F": ["G"], "G": []}
G2 = {1: [2], 2: [3, 1], 3: [4], 4: [1, 5], 5: []}
G3 = {"x": ["y"], "y": ["z"]}
'''
python_task("bfs_shortest_path", (
    "Write a Python function `shortest_path(graph, start, goal)`. `graph` maps each node to the list of nodes it "
    "has an edge to (directed; a node without outgoing edges may be missing from the dict; there can be cycles). "
    "Return the list of nodes of a shortest path from start to goal, both included, or None when goal cannot be "
    "reached. Use breadth-first search."),
    ["shortest_path"],
    [("shortest_path(G1, 'A', 'G')", ["A", "C", "E", "G"]), ("shortest_path(G1, 'A', 'F')", ["A", "B", "D", "F"]),
     ("shortest_path(G1, 'G', 'A')", None), ("shortest_path(G1, 'A', 'A')", ["A"]),
     ("shortest_path(G2, 1, 5)", [1, 2, 3, 4, 5]), ("shortest_path(G2, 3, 2)", [3, 4, 1, 2]),
     ("shortest_path(G3, 'x', 'z')", ["x", "y", "z"]), ("shortest_path(G3, 'z', 'x')", None)],
    check=lambda got, expected: (list(got) if isinstance(got, (list, tuple)) else got) == expected, setup=_GRAPHS)

python_task("find_the_bug", (
    "This function should return the averages of every run of `window` consecutive values, in order (an empty "
    "list when there are fewer values than `window`), but it has a bug:\n\n```python\n"
    "def moving_average(values, window):\n    result = []\n    for i in range(len(values) - window):\n"
    "        result.append(sum(values[i:i + window]) / window)\n    return result\n```\n\n"
    "Find the bug and give the fixed function, with the same name."),
    ["moving_average"],
    [("moving_average([1, 2, 3, 4], 2)", [1.5, 2.5, 3.5]), ("moving_average([5], 1)", [5.0]),
     ("moving_average([1, 2, 3], 3)", [2.0]), ("moving_average([1, 2], 3)", []),
     ("moving_average([2, 4, 6, 8, 10], 3)", [4.0, 6.0, 8.0])])


def _flatten_iterative(tree: ast.Module) -> str | None:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "flatten" and _calls(node, "flatten"):
            return "flatten still calls itself"
    return None


python_task("recursive_to_iterative", (
    "Rewrite this recursive function as an iterative one with the same name and the same result (no recursion: "
    "it must work on lists nested 10,000 levels deep):\n\n```python\ndef flatten(items):\n    out = []\n"
    "    for x in items:\n        if isinstance(x, list):\n            out.extend(flatten(x))\n        else:\n"
    "            out.append(x)\n    return out\n```"),
    ["flatten"],
    [("flatten([])", []), ("flatten([1, [2, [3, 4]], 5])", [1, 2, 3, 4, 5]), ("flatten([[], [[]], [1]])", [1]),
     ("flatten(['a', ['b'], 'c'])", ["a", "b", "c"]), ("flatten([[1, 2], 3, [[4], 5]])", [1, 2, 3, 4, 5]),
     ("flatten(deep(10000))", list(range(10001)))],
    static=_flatten_iterative,
    setup="\ndef deep(n):\n    nested = [n]\n    for i in range(n - 1, -1, -1):\n        nested = [i, nested]\n"
          "    return nested\n")

_QUADRATIC = ("def has_duplicates(items):\n    for i in range(len(items)):\n        for j in range(i + 1, len(items)):"
              "\n            if items[i] == items[j]:\n                return True\n    return False\n")


def _complexity(reply: Reply) -> Grade:
    stated = re.search(r"complexity\W{0,3}:\W{0,3}(?:\$|`)?\s*O\s*\(([^)\n]*)\)", reply.text, re.I)
    if stated is None:
        return fail("no 'Complexity: O(...)' line")
    big_o = re.sub(r"\s|\\", "", stated.group(1)).replace("²", "^2").replace("**", "^").replace("{2}", "2")
    if big_o.lower() not in ("n^2", "n*n", "n·n", "n⋅n", "ncdotn"):
        return fail(f"stated O({stated.group(1)}), expected O(n^2)")
    code = _code(reply)
    if code is None:
        return fail(NO_FENCE)
    grade = run_python(code, ["has_duplicates"], [
        ("has_duplicates([])", False), ("has_duplicates([1])", False), ("has_duplicates([1, 2, 1])", True),
        ("has_duplicates(['a', 'b'])", False), ("has_duplicates(list(range(20000)))", False),
        ("has_duplicates(list(range(20000)) + [19999])", True)], case_seconds=1.0)
    return Grade(grade.passed, f"O(n^2) stated; rewrite: {grade.reason}")


register(Test("complexity_analysis", "programming", [{"role": "user", "content": (
    f"```python\n{_QUADRATIC}```\n\n1. What is the time complexity of has_duplicates for a list of n items? Give it "
    "on its own line as `Complexity: O(...)`.\n2. Rewrite has_duplicates to run in O(n) time (the items are "
    "hashable), keeping its name, in one fenced ```python code block.")}], _complexity, max_tokens=1024))

python_task("anagram_groups", (
    "Write a Python function `group_anagrams(words)` that groups the words that are anagrams of each other and "
    "returns a list of groups (lists of words). The order of the groups and of the words in a group does not "
    "matter; repeated words stay repeated."),
    ["group_anagrams"],
    [("group_anagrams(['eat', 'tea', 'tan', 'ate', 'nat', 'bat'])", [["eat", "tea", "ate"], ["tan", "nat"], ["bat"]]),
     ("group_anagrams([''])", [[""]]), ("group_anagrams(['a'])", [["a"]]), ("group_anagrams([])", []),
     ("group_anagrams(['ab', 'ba', 'abc', 'cab', 'bca', 'xyz'])", [["ab", "ba"], ["abc", "cab", "bca"], ["xyz"]]),
     ("group_anagrams(['tea', 'tea', 'eat'])", [["tea", "tea", "eat"]])],
    check=lambda got, expected: _canon(got) == _canon(expected))


def _canon(groups: Any) -> list[list[Any]]:
    return sorted(sorted(group) for group in groups)


def _roman(reply: Reply) -> Grade:
    code = _code(reply, ("javascript", "js", "node", "nodejs"))
    if code is None:
        return fail(NO_FENCE)
    return run_javascript(code, "romanToInt", [
        (["III"], 3), (["IV"], 4), (["IX"], 9), (["LVIII"], 58), (["MCMXCIV"], 1994), (["MMXXVI"], 2026),
        (["CDXLIV"], 444), (["MMMCMXCIX"], 3999)])


register(Test("javascript", "programming", [{"role": "user", "content": (
    "Write a JavaScript function `romanToInt(s)` that converts a Roman numeral (1 to 3999) to an integer. Plain "
    "Node.js: no modules, imports or exports needed." + FENCE.format("javascript"))}], _roman, max_tokens=1024))

SCHEMA = '''
CREATE TABLE departments (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT NOT NULL, department_id INTEGER REFERENCES departments(id),
                        salary INTEGER NOT NULL);
'''
_ROWS = '''
INSERT INTO departments VALUES (1, 'Engineering'), (2, 'Sales'), (3, 'Support'), (4, 'Legal'), (5, 'Research');
INSERT INTO employees VALUES
  (1, 'Ada', 1, 95000), (2, 'Brook', 1, 105000), (3, 'Cy', 1, 88000), (4, 'Dee', 2, 60000), (5, 'Eli', 2, 72500),
  (6, 'Fay', 3, 41000), (7, 'Gus', 3, 43000), (8, 'Hal', 3, 45500), (9, 'Ivy', 4, 120000),
  (10, 'Jo', NULL, 50000), (11, 'Kit', NULL, 52000);
'''
SQL_COLUMNS = ["department", "employees", "avg_salary"]
SQL_EXPECTED = [("Engineering", 3, 96000.0), ("Sales", 2, 66250.0), ("Support", 3, 43166.67)]
_SQL_MAIN = r'''
import sqlite3
import time


def _main():
    db = sqlite3.connect(":memory:")
    db.executescript(SCHEMA + ROWS)
    query = open("query.sql", encoding="utf-8").read().strip()
    deadline = time.monotonic() + 2.0
    db.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
    try:
        cursor = db.execute(query)
        rows = cursor.fetchall()
    except BaseException as e:
        if time.monotonic() > deadline:
            return {"error": "the query took longer than 2 s"}
        return {"error": f"the query failed: {type(e).__name__}: {e}"}
    return {"columns": [d[0].lower() for d in cursor.description or ()], "rows": _encode(rows)}


_verdict(_main())
'''


def _sql(reply: Reply) -> Grade:
    query = _code(reply, ("sql", "sqlite", "sqlite3"))
    if query is None:
        return fail(NO_FENCE)
    harness = PRELUDE + f"SCHEMA = {SCHEMA!r}\nROWS = {_ROWS!r}\n" + _SQL_MAIN
    data = reported(sandbox("python", {"query.sql": query, "check.py": harness}, ["check.py"]))
    if isinstance(data, Grade):
        return data
    if data.get("columns") != SQL_COLUMNS:
        return fail(f"columns are {data.get('columns')}, expected {SQL_COLUMNS}")
    try:
        rows = [tuple(row) for row in decode(data["rows"])]
    except (KeyError, TypeError, ValueError) as exc:
        return fail(f"the harness reported no rows ({exc})")
    good = len(rows) == len(SQL_EXPECTED) and all(
        len(r) == len(e) and all(abs(a - b) < 1e-6 if isinstance(b, float) and isinstance(a, (int, float))
                                 else a == b for a, b in zip(r, e, strict=True)) for r, e in zip(rows, SQL_EXPECTED,
                                                                                               strict=True))
    return Grade(good, "1/1 cases" if good else f"0/1 cases; first failure: rows {short(rows)}, expected "
                 f"{short(SQL_EXPECTED)}")


register(Test("sql_query", "programming", [{"role": "user", "content": (
    f"A SQLite database has these tables:\n\n```sql{SCHEMA}```\n\nWrite one SQL query that lists, for every "
    "department with at least two employees, the department's name as `department`, its number of employees as "
    "`employees` and their average salary rounded to 2 decimals as `avg_salary`, highest average salary first. "
    "Employees without a department are not counted." + FENCE.format("sql"))}], _sql, max_tokens=512))

LEAP = "def is_leap_year(year):\n    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)\n"
BUGGY_LEAPS = {"without the 400-year rule": "def is_leap_year(year):\n    return year % 4 == 0 and year % 100 != 0\n",
               "without the century rules": "def is_leap_year(year):\n    return year % 4 == 0\n"}
_PYTEST_ARGS = ["-q", "-p", "no:cacheprovider", "test_leap.py"]


def _pytest(tests: str, implementation: str) -> Any:
    return sandbox("pytest", {"leap.py": implementation, "test_leap.py": tests}, _PYTEST_ARGS)


_PYTEST_SECONDS = re.compile(r" in \d+(?:\.\d+)?s(?: \(\d+:\d\d:\d\d\))?")


def _summary(result: Any) -> str:
    if result.timed_out:
        return "timed out"
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    # pytest's closing line without its duration ("1 failed in 0.03s"): eval.json holds no timing
    return clip(_PYTEST_SECONDS.sub("", lines[-1])) if lines else f"exit {result.returncode}"


def _unit_tests(reply: Reply) -> Grade:
    tests = _code(reply)
    if tests is None:
        return fail(NO_FENCE)
    result = _pytest(tests, LEAP)
    if result.returncode != 0:
        return fail(f"the tests do not pass on the correct is_leap_year (exit {result.returncode}): "
                    f"{_summary(result)}")
    passed = _summary(result)
    for bug, implementation in BUGGY_LEAPS.items():
        result = _pytest(tests, implementation)
        if result.returncode != 1:
            return fail(f"the tests do not fail on is_leap_year {bug} (exit {result.returncode}): {_summary(result)}")
    return ok(f"pass on the correct function ({passed}), fail on both buggy ones")


register(Test("pytest_generation", "programming", [{"role": "user", "content": (
    f"Here is leap.py:\n\n```python\n{LEAP}```\n\nWrite a pytest test file, test_leap.py, that imports it with "
    "`from leap import is_leap_year` and tests it thoroughly: the tests must pass on this implementation and "
    "catch mistakes in the century rules." + FENCE.format("python"))}], _unit_tests, max_tokens=1024))
