"""The README and docs/: the README stays short, every docs page is linked from it, every relative link resolves, and
every `doit ...` command shown names a doit command or a task of dodo.py, with options that task (or doit) takes.

Fast and offline: reads files only (dodo.py through ast, never imported), runs no doit and no llama.cpp."""
from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

# doit's own commands, and the few doit options the docs may show (tasks' own options come from dodo.py).
DOIT_COMMANDS = {"run", "list", "info", "forget", "clean", "dumpdb", "help", "ignore", "reset-dep", "strace",
                 "tabcompletion", "auto"}
DOIT_VALUE_OPTIONS = {"-n", "--process", "-P", "--parallel-type", "-v", "--verbosity", "-f", "--file", "-d", "--dir",
                      "--template"}
DOIT_OPTIONS = DOIT_VALUE_OPTIONS | {"-a", "--always-execute", "-c", "--continue", "-s", "--single", "-k",
                                     "--seek-file", "--all", "--status", "--private", "--deps", "--clean-dep",
                                     "--clean-all"}

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")
SEPARATORS = re.compile(r"#|&&|\|\||;|\|")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


def lines_of(page: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, in a code block) for each line: fenced blocks and 4-space indented blocks are code."""
    fenced = False
    previous_blank = True
    indented = False
    for number, text in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(text):
            fenced = not fenced
            yield number, text, True
            previous_blank = False
            continue
        if fenced:
            yield number, text, True
            continue
        if text.strip() == "":
            yield number, text, indented
            previous_blank = True
            continue
        # an indented block starts after a blank line (or continues one); list-item continuations are indented less
        is_indented = text.startswith("    ") and (indented or previous_blank) and not re.match(r"\s*([-*+]|\d+\.)\s",
                                                                                             text)
        indented = is_indented
        previous_blank = False
        yield number, text, is_indented


def prose(text: str) -> str:
    """A prose line without its inline code spans (links inside code are not links)."""
    return INLINE_CODE.sub("", text)


def links(page: Path) -> Iterator[tuple[int, str]]:
    for number, text, code in lines_of(page):
        if not code:
            for match in LINK.finditer(prose(text)):
                yield number, match.group(1)


def is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith(("#", "//"))


def resolve(page: Path, target: str) -> Path:
    return (page.parent / target.split("#", 1)[0]).resolve()


# ------------------------------------------------------------------------------------------------------ dodo.py

def dodo_tasks() -> dict[str, set[str]]:
    """Task basenames of dodo.py (``def task_<name>``, and one per kind of stage in steps.constants.STAGES) and the
    long option names each declares (``"long": ...``)."""
    tree = ast.parse((ROOT / "dodo.py").read_text(encoding="utf-8"))
    tasks: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("task_"):
            options = set()
            for sub in ast.walk(node):
                if isinstance(sub, ast.Dict):
                    for key, value in zip(sub.keys, sub.values, strict=True):
                        if (isinstance(key, ast.Constant) and key.value == "long"
                                and isinstance(value, ast.Constant) and isinstance(value.value, str)):
                            options.add(f"--{value.value}")
            tasks[node.name.removeprefix("task_")] = options
    from steps.constants import STAGES             # dodo.py makes one task_<kind> per entry of this table
    for kind in STAGES:
        tasks.setdefault(kind, set())
    return tasks


def doit_commands(page: Path) -> Iterator[tuple[int, str]]:
    """(line, command) for each ``doit ...`` shown in code: in code blocks (comments included, each part between
    ``#``, ``;``, ``&&``, ``|`` on its own) and in inline code spans. A part is a doit command when its first word,
    after any ``VAR=value`` assignments, is ``doit`` (or a path ending in ``/doit``)."""
    for number, text, code in lines_of(page):
        parts = [m.group(2) for m in INLINE_CODE.finditer(text)]
        if code:
            parts.append(INLINE_CODE.sub(" ", text))
        for piece in (piece for part in parts for piece in SEPARATORS.split(part)):
            words = piece.split()
            while words and ENV_ASSIGNMENT.match(words[0]):
                words.pop(0)
            if words and (words[0] == "doit" or words[0].endswith("/doit")):
                yield number, " ".join(words)


def command_problem(command: str, tasks: dict[str, set[str]]) -> str | None:
    """Why a shown ``doit ...`` command line is wrong, or None. The first word after ``doit`` (options aside) is a
    doit command or a task basename (``name`` or ``name:subtask``); later words with a ``:`` name tasks too; an
    option belongs to the task before it (dodo.py's ``"long"``) or is one of doit's."""
    words = command.split()[1:]
    current: str | None = None          # the task the options that follow belong to
    seen_first = False
    takes_value = False
    for word in words:
        if takes_value:                 # the value of a doit option such as -n 4
            takes_value = False
            continue
        if word.startswith("-"):
            option = word.split("=", 1)[0]
            allowed = DOIT_OPTIONS | (tasks[current] if current else set())
            if option not in allowed:
                owner = f"task {current!r}" if current else "doit"
                return f"option {option!r} is not one {owner} takes (known: {', '.join(sorted(allowed))})"
            takes_value = option in DOIT_VALUE_OPTIONS and "=" not in word
            continue
        word = word.strip("().,`'\"")
        if not word:
            continue
        if not seen_first:
            seen_first = True
            if word in DOIT_COMMANDS:
                current = None
                continue
        elif ":" not in word:
            continue                     # a value or prose after the command: not a task name
        basename = word.split(":", 1)[0]
        if basename not in tasks:
            return (f"{basename!r} is neither a doit command ({', '.join(sorted(DOIT_COMMANDS))}) nor a task of "
                    f"dodo.py ({', '.join(sorted(tasks))})")
        current = basename
    return None


# ------------------------------------------------------------------------------------------------------- tests

def test_readme_is_short() -> None:
    count = len(README.read_text(encoding="utf-8").splitlines())
    assert count < 200, f"README.md has {count} lines; keep it under 200 and move detail into docs/"


def test_readme_links_every_docs_page_and_only_existing_ones() -> None:
    linked = {resolve(README, target) for _, target in links(README) if is_relative(target)
              and target.split("#", 1)[0].startswith("docs/")}
    missing = [f"README.md:{n}: {t}" for n, t in links(README)
               if is_relative(t) and t.startswith("docs/") and not resolve(README, t).is_file()]
    assert not missing, "README links docs pages that do not exist:\n" + "\n".join(missing)
    unlinked = [rel(p) for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {', '.join(unlinked)}"
    assert sorted(DOCS.glob("*.md")), "docs/ holds no pages"


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", text.lstrip("#").strip().lower()).replace(" ", "-")
            for _, text, code in lines_of(page) if not code and re.match(r"#{1,6} ", text)}


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page: Path) -> None:
    broken = [f"{rel(page)}:{n}: {t}" for n, t in links(page) if is_relative(t) and not resolve(page, t).exists()]
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)
    for n, t in links(page):
        target = resolve(page, t) if is_relative(t) and not t.startswith("#") else page if t.startswith("#") else None
        if target is not None and "#" in t and target.suffix == ".md":
            fragment = t.split("#", 1)[1]
            assert fragment in anchors(target), f"{rel(page)}:{n}: {t}: {rel(target)} has no heading #{fragment}"


@pytest.mark.parametrize("page", [p for p in PAGES if p.parent == DOCS], ids=rel)
def test_docs_pages_have_a_title_and_link_back(page: Path) -> None:
    lines = page.read_text(encoding="utf-8").splitlines()
    assert lines and lines[0].startswith("# "), f"{rel(page)}:1: a docs page starts with '# Title'"
    assert any(resolve(page, t) == README.resolve() for _, t in links(page) if is_relative(t)), \
        f"{rel(page)}: no link back to the README"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_doit_commands_exist(page: Path) -> None:
    tasks = dodo_tasks()
    bad = [f"{rel(page)}:{n}: `{c}`: {why}" for n, c in doit_commands(page)
           if (why := command_problem(c, tasks)) is not None]
    assert not bad, "doit commands that dodo.py does not define:\n" + "\n".join(bad)


def test_the_command_checker_catches_what_it_should(tmp_path: Path) -> None:
    tasks = {"quantize": set(), "publish": {"--dry-run"}, "verify": {"--full"}, "gc": {"--keep"}}
    assert command_problem("doit", tasks) is None
    assert command_problem("doit list --all", tasks) is None
    assert command_problem("doit quantize:demo-Q4_K_M", tasks) is None
    assert command_problem("doit publish:demo --dry-run", tasks) is None
    assert command_problem("doit gc --keep 5", tasks) is None
    assert command_problem("doit forget quantize:demo", tasks) is None
    assert "'quantise'" in (command_problem("doit quantise", tasks) or "")
    assert "--dry-run" in (command_problem("doit quantize --dry-run", tasks) or "")
    assert "--full" in (command_problem("doit gc --full", tasks) or "")
    assert "'merge'" in (command_problem("doit info merge:demo", tasks) or "")
    assert command_problem("doit -n 2 quantize", tasks) is None
    page = tmp_path / "probe.md"
    page.write_text("# Probe\n\n    MERGEFORGE_UPDATE=1 doit verfiy   # typo; doit list\n\nand `doit gc --keep 2`,\n"
                    "not build/.doit.json or pydoit.org\n\n```yaml\nkey: 1   # doit publish:<recipe> only\n```\n")
    assert list(doit_commands(page)) == [(3, "doit verfiy"), (3, "doit list"), (5, "doit gc --keep 2"),
                                         (9, "doit publish:<recipe> only")]


# ------------------------------------------------------------------------------------------------ recipe keys

ANY = "<any name>"             # a key the recipe chooses: a source's name


def recipe_schema() -> dict[str, object]:
    """Every key a recipe may hold, as the schema declares it (steps/recipe: TOP_KEYS and each block's Field table):
    a dict of key -> sub-schema, a one-element list for a list of such entries, None for a value."""
    from steps import methods
    from steps.recipe import TOP_KEYS
    from steps.recipe.blocks import BENCH, GATES, GGUF, IMATRIX, PUBLISH_KEYS, QUANT_KEYS
    from steps.recipe.eval import EVAL, SERVER
    from steps.recipe.heal import DATA, HEAL, LORA, TRAIN
    from steps.recipe.matrix import RANK
    from steps.recipe.merge import MERGE_KEYS, SLICE_KEYS, SLICE_SOURCE_KEYS
    from steps.recipe.sources import SOURCE_KEYS

    def leaves(keys: object) -> dict[str, object]:
        return {str(k): None for k in keys}                       # type: ignore[attr-defined]

    params = leaves({p for name in methods.names() for p in methods.params(name)})
    source = {**leaves(SLICE_SOURCE_KEYS), "parameters": params}
    schema: dict[str, object] = {
        **leaves(TOP_KEYS),
        "sources": {ANY: leaves(SOURCE_KEYS)},
        "merge": {**leaves(MERGE_KEYS), "parameters": params, "models": [source],
                  "slices": [{**leaves(SLICE_KEYS), "sources": [source], "parameters": params}]},
        "gguf": leaves(GGUF), "imatrix": leaves(IMATRIX), "bench": leaves(BENCH), "quantize": [leaves(QUANT_KEYS)],
        "heal": {**leaves(HEAL), "lora": leaves(LORA), "train": leaves(TRAIN), "data": [leaves(DATA)]},
        "eval": {**leaves(EVAL), "server": leaves(SERVER)},
        "publish": leaves(PUBLISH_KEYS),
        "gates": {**leaves(GATES), "category_min": {ANY: None}},
        "matrix": {"rank": leaves(RANK), "exclude": [{ANY: None}], "include": [{ANY: None}], ANY: None},
    }
    assert set(schema) == set(TOP_KEYS)
    return schema


def unknown_keys(value: object, schema: object, path: str) -> Iterator[str]:
    """The dotted path of every key in ``value`` the schema does not declare."""
    if isinstance(schema, list) and isinstance(value, list):
        for i, item in enumerate(value):
            yield from unknown_keys(item, schema[0], f"{path}[{i}]")
    elif isinstance(schema, dict) and isinstance(value, dict):
        for key, sub in value.items():
            where = f"{path}.{key}" if path else str(key)
            if str(key) in schema:
                yield from unknown_keys(sub, schema[str(key)], where)
            elif ANY in schema:
                yield from unknown_keys(sub, schema[ANY], where)
            else:
                yield where


YAML_BLOCK = re.compile(r"^```ya?ml\n(.*?)^```", re.M | re.S)
DOTTED_KEY = re.compile(r"`((?:sources|merge|gguf|imatrix|quantize|heal|bench|eval|publish|gates)"
                        r"(?:\.[a-z_]+|\[\d+\])+)(?::[^`]*)?`")
FILE_SUFFIXES = (".py", ".md", ".json", ".yaml", ".yml", ".txt", ".gguf", ".png", ".log")   # `merge.py` is a file


def key_problems(page: Path, schema: dict[str, object]) -> list[str]:
    import yaml
    text = page.read_text(encoding="utf-8")
    problems = []
    for block in YAML_BLOCK.finditer(text):
        line = text[:block.start()].count("\n") + 2
        try:
            value = yaml.safe_load(block.group(1))
        except yaml.YAMLError as exc:
            problems.append(f"{rel(page)}:{line}: a YAML block that does not parse: {exc}")
            continue
        problems += [f"{rel(page)}:{line}: YAML block: `{key}` is not a recipe key"
                     for key in unknown_keys(value, schema, "")]
    for number, line_text, _ in lines_of(page):
        for match in DOTTED_KEY.finditer(line_text):
            dotted = match.group(1)
            if dotted.endswith(FILE_SUFFIXES):
                continue
            parts = [p for p in re.split(r"\.|(\[\d+\])", dotted) if p]
            value: object = None
            for part in reversed(parts):                  # build the smallest recipe that holds the key
                value = [value] if part.startswith("[") else {part: value}
            problems += [f"{rel(page)}:{number}: `{dotted}` is not a recipe key ({key})"
                         for key in unknown_keys(value, schema, "")]
    return problems


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_recipe_key_a_page_shows_exists(page: Path) -> None:
    """Every key of every YAML block, and every dotted recipe key in inline code (`heal.train.max_steps`), is one
    the schema declares: a renamed key fails here, naming the page and the line."""
    problems = key_problems(page, recipe_schema())
    assert not problems, "\n".join(problems)


def test_the_key_checker_catches_what_it_should(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# T\n\n```yaml\nheal:\n  train: {max_step: 4}\nmerge: {slices: [{sources: [{modle: a}]}]}\n"
                    "sources: {mine: {paht: x}}\n```\n\nSet `eval.server.paralel` or `gguf.outtype`.\n")
    problems = key_problems(page, recipe_schema())
    assert [p.split(": ", 1)[1] for p in problems] == [
        "YAML block: `heal.train.max_step` is not a recipe key",
        "YAML block: `merge.slices[0].sources[0].modle` is not a recipe key",
        "YAML block: `sources.mine.paht` is not a recipe key",
        "`eval.server.paralel` is not a recipe key (eval.server.paralel)"], problems
