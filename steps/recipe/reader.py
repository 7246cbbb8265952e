"""Reading a recipe file: PyYAML's safe loader, refusing what it silently accepts (duplicate keys, alias bombs),
and a RecipeError for a file that is not a recipe at all (a directory, too large, not UTF-8, not YAML)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from steps.errors import RecipeError

MAX_RECIPE_BYTES = 1 << 20
MAX_NODES = 100_000                 # YAML values after alias expansion


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what it silently accepts: duplicate keys (it keeps the last) and alias
    chains that expand beyond any recipe's size (an alias bomb)."""

    def compose_document(self) -> Any:
        node = super().compose_document()
        _expanded_size(node, {})
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(str(key), seen[key], line)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key: str, first: int, second: int) -> None:
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _TooLarge(Exception):
    pass


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """Nodes in the document once every alias is expanded (memoized: a bomb is measured without expanding it)."""
    if id(node) in memo:
        return memo[id(node)]
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    if size > MAX_NODES:
        raise _TooLarge()
    memo[id(node)] = size
    return size


def read_yaml(file: Path) -> Any:
    """A recipe file's YAML, or a RecipeError saying what is wrong with the file itself."""
    where = str(file)
    if file.is_dir():
        raise RecipeError(where, "-", "is a directory, not a recipe file; rename it or move it out of the recipes "
                          "directory")
    try:
        size = file.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(where, "-", f"{size} bytes is not a recipe (at most {MAX_RECIPE_BYTES} bytes); give "
                              "the YAML file, not a model or data file")
        data = file.read_bytes()
    except FileNotFoundError:
        raise RecipeError(where, "-", "recipe file not found") from None
    except OSError as exc:
        raise RecipeError(where, "-", f"cannot read the recipe: {exc.strerror}; check its permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(where, "-", f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                          "save the recipe as UTF-8") from None
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise RecipeError(where, exc.key, f"duplicate key (lines {exc.first} and {exc.second}); YAML would keep "
                          "only the last one: keep one") from None
    except _TooLarge:
        raise RecipeError(where, "-", f"the YAML expands to more than {MAX_NODES} values (aliases of aliases); "
                          "write the recipe out without nested aliases") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(where, "-", f"not valid YAML{at}: {problem}; fix the syntax there") from None
    except RecursionError:
        raise RecipeError(where, "-", "the YAML nests too deeply; a recipe is a few levels of mappings") from None

