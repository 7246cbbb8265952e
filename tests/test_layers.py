"""The house rules the code shows: the layers, bottom to top, with no import from a lower floor up and no circle
(imports inside functions and under TYPE_CHECKING count); no module in steps/ over 600 lines; MERGEFORGE_*
variables read in steps/settings.py only. Read from the source with ast: nothing is imported."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 600

# Bottom to top; a module imports only from its own floor or below. A module not named here fails the test: give
# it a floor.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("constants, errors, settings", ("steps", "steps.constants", "steps.errors", "steps.settings")),
    ("tools: tensors, hashing, files, toolchain, sandbox, methods, hub, server, evalsuite",
     ("steps.files", "steps.tensors", "steps.hashing", "steps.toolchain", "steps.sandbox", "steps.methods",
      "steps.hub", "steps.server", "steps.evalsuite")),
    ("recipe schema", ("steps.recipe",)),
    ("stage interface and planner", ("steps.stage", "steps.plan")),
    ("store / executor", ("steps.store",)),
    ("stages", ("steps.fetch", "steps.merge", "steps.heal", "steps.convert", "steps.imatrix", "steps.quantize",
                "steps.bench", "steps.eval", "steps.scoreboard", "steps.publish")),
    ("dodo.py", ("dodo",)),
]


def modules() -> dict[str, Path]:
    found = {"dodo": ROOT / "dodo.py"}
    for path in sorted((ROOT / "steps").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def floor(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    if best is None:
        raise AssertionError(f"{module} has no floor: add it to FLOORS in tests/test_layers.py")
    return best[0]


def imports(name: str, path: Path, known: dict[str, Path]) -> set[tuple[str, int]]:
    """(imported project module, line) for every import statement anywhere in the file."""
    def resolve(dotted: str) -> str | None:
        while dotted:
            if dotted in known:
                return dotted
            dotted = dotted.rpartition(".")[0]
        return None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[tuple[str, int]] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        for target in targets:
            module = resolve(target)
            if module is not None and module != name:
                found.add((module, node.lineno))
    return found


def graph() -> dict[str, set[tuple[str, int]]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_floor() -> None:
    for name in modules():
        floor(name)


def test_no_import_runs_from_a_lower_floor_up() -> None:
    known = modules()
    bad = []
    for name, edges in graph().items():
        for target, line in sorted(edges):
            if floor(target) > floor(name):
                bad.append(f"{known[name].relative_to(ROOT)}:{line}: {name} ({FLOORS[floor(name)][0]}) imports "
                           f"{target} ({FLOORS[floor(target)][0]})")
    assert not bad, "imports up the layers:\n" + "\n".join(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    plain = {name: {target for target, _ in edges} for name, edges in graph().items()}
    found = cycles(plain)
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("path", sorted((ROOT / "steps").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_in_steps_is_over_600_lines(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (at most {MAX_LINES}): split its concerns"


def _environ_reads(tree: ast.AST) -> list[tuple[int, ast.expr | None]]:
    """(line, name argument) of each os.environ.get / os.getenv / os.environ[...] read."""
    found: list[tuple[int, ast.expr | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            is_get = f.attr == "get" and isinstance(f.value, ast.Attribute) and f.value.attr == "environ"
            if is_get or f.attr == "getenv":
                found.append((node.lineno, node.args[0] if node.args else None))
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "environ":
            found.append((node.lineno, node.slice))
    return found


def test_only_settings_reads_mergeforge_variables() -> None:
    bad = []
    for name, path in modules().items():
        if name == "steps.settings":
            continue
        tree = ast.parse(path.read_text())
        constants = {t.id: n.value.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                     and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                     for t in n.targets if isinstance(t, ast.Name)}
        for line, arg in _environ_reads(tree):
            value = arg.value if isinstance(arg, ast.Constant) else constants.get(getattr(arg, "id", ""), "")
            if isinstance(value, str) and value.startswith("MERGEFORGE_"):
                bad.append(f"{path.relative_to(ROOT)}:{line}: reads {value}; ask steps.settings")
    assert not bad, "\n".join(bad)


def test_every_setting_is_documented() -> None:
    from steps.settings import SETTINGS
    page = (ROOT / "docs" / "settings.md").read_text()
    missing = [s.name for s in SETTINGS if f"`{s.name}`" not in page]
    assert not missing, f"docs/settings.md does not document {', '.join(missing)}"
    used = set()
    for path in [*(ROOT / "steps").rglob("*.py"), ROOT / "dodo.py"]:
        used.update(re.findall(r"MERGEFORGE_[A-Z]+(?:_[A-Z]+)*", path.read_text()))
    undeclared = sorted(used - {s.name for s in SETTINGS})
    assert not undeclared, f"named in the code but not declared in steps/settings.py: {', '.join(undeclared)}"
