"""How a recipe block is declared and checked: a table of ``Field``s per block (type, default, range or choices),
checked in one place, so every type and range error reads the same way and names the file, the key and the fix.

    GGUF = {"outtype": Field("choice", "bf16", choices=GGUF_OUTTYPES), ...}
    spec = check.block(raw.get("gguf"), "gguf", GGUF)        # unknown keys refused, defaults filled, values checked
"""
from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steps.errors import RecipeError


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()     # a Field default: the key must be given
NONE: Any = None                # a Field default: absent means None (and None stays None)


def did_you_mean(word: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if c.lower() == word.lower()]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Field:
    """One key of a block. ``kind``: "int" (a whole number), "number" (finite; a string YAML did not read as a
    number, such as ``2e-5``, is read as one), "bool", "choice" (one of ``choices``), "str" (non-empty), "list",
    "mapping" or "any" (checked by the block's own code). ``lo``/``hi`` bound numbers (excluded when
    ``lo_open``/``hi_open``). ``what`` overrides the expected text of the error ("expected <what>, got ..."),
    ``noun`` names a choice ("unknown <noun> 'x'; one of ..."), ``hint`` follows the choices. ``yaml_bools`` maps
    YAML's booleans (``off``/``on`` are read as false/true) to choices: (value for false, value for true)."""
    kind: str
    default: Any = NONE
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    what: str = ""
    noun: str = "value"
    hint: str = ""
    yaml_bools: tuple[str, str] | None = None
    lower: bool = False
    as_float: bool = True           # a "number" is normalized to a float (False: kept as written, 0 stays 0)

    def expected(self) -> str:
        if self.what:
            return self.what
        if self.kind == "bool":
            return "true or false"
        if self.kind == "int":
            if self.lo == 1 and self.hi is None:
                return "a positive integer"
            if self.lo is not None and self.hi is None:
                return f"an integer >= {_num(self.lo)}"
            if self.lo is not None and self.hi is not None:
                return f"an integer from {_num(self.lo)} to {_num(self.hi)}"
            return "an integer"
        if self.kind == "number":
            if self.lo == 0 and self.lo_open and self.hi is None:
                return "a positive number"
            if self.lo is not None and self.hi is None:
                return f"a number {'>' if self.lo_open else '>='} {_num(self.lo)}"
            if self.lo is not None and self.hi is not None:
                if not self.lo_open and not self.hi_open:
                    return f"a number from {_num(self.lo)} to {_num(self.hi)}"
                return (f"a number in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}"
                        f"{')' if self.hi_open else ']'}")
            return "a number"
        if self.kind == "str":
            return "a non-empty string"
        if self.kind == "list":
            return "a list"
        if self.kind == "mapping":
            return "a mapping"
        return "a value"

    def _in_range(self, value: float) -> bool:
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return not (self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)))


class Checker:
    """Checks one recipe file's values; every error it raises names the file and the dotted key."""

    def __init__(self, file: str | Path) -> None:
        self.file = str(file)

    def fail(self, key: str, message: str) -> RecipeError:
        return RecipeError(self.file, key, message)

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping with keys {', '.join(allowed)}, got {type(value).__name__}")
        for k in value:
            if k not in allowed:
                where = f"{key}.{k}" if key else str(k)
                raise self.fail(where, f"unknown key{did_you_mean(str(k), allowed)}; allowed: {', '.join(allowed)}")
        return value

    def typed(self, value: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise self.fail(key, f"expected {what}, got {value!r}")
        return value

    def positive_int(self, value: Any, key: str) -> int:
        return int(self.value(Field("int", lo=1), value, key))

    def existing_file(self, value: Any, key: str, base: Path) -> Path:
        self.typed(value, key, str, "a file path")
        path = (base / value).resolve()
        if not path.is_file():
            raise self.fail(key, f"file not found: {path}; give a path relative to {base}")
        return path

    def value(self, spec: Field, value: Any, key: str) -> Any:
        """One value checked against its Field, normalized (numbers as float, choices as written in ``choices``)."""
        bad = self.fail(key, f"expected {spec.expected()}, got {value!r}")
        if spec.kind == "bool":
            if not isinstance(value, bool):
                raise bad
            return value
        if spec.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int) or not spec._in_range(value):
                raise bad
            return int(value)
        if spec.kind == "number":
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    pass
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not spec._in_range(value)):
                raise bad
            return float(value) if spec.as_float else value
        if spec.kind == "choice":
            if isinstance(value, bool) and spec.yaml_bools is not None:
                return spec.yaml_bools[int(value)]
            wanted = value.lower() if spec.lower and isinstance(value, str) else value
            if wanted not in spec.choices:
                hint = f" {spec.hint}" if spec.hint else ""
                raise self.fail(key, f"unknown {spec.noun} {value!r}{did_you_mean(str(value), spec.choices)}; one "
                                f"of {', '.join(spec.choices)}{hint}")
            return wanted
        if spec.kind == "str":
            if not isinstance(value, str) or not value:
                raise bad
            return value
        if spec.kind == "list":
            if not isinstance(value, list):
                raise bad
            return value
        if spec.kind == "mapping":
            if not isinstance(value, dict):
                raise bad
            return value
        return value

    def block(self, value: Any, key: str, fields: dict[str, Field], *, fill: bool = True) -> dict[str, Any]:
        """A block's mapping: unknown keys refused (with a did-you-mean), every default filled (``fill``; else only
        the keys given), every value checked against its Field (None stays None where the default is None). A
        missing REQUIRED key fails."""
        given = self.mapping(value if value is not None else {}, key, tuple(fields))
        out: dict[str, Any] = {}
        for name, spec in fields.items():
            where = f"{key}.{name}" if key else name
            if name in given:
                raw = given[name]
            elif spec.default is REQUIRED:
                raise self.fail(where, "missing")
            elif fill:
                raw = copy.deepcopy(spec.default)
            else:
                continue
            out[name] = None if raw is None and spec.default is None else self.value(spec, raw, where)
        return out


def defaults(fields: dict[str, Field]) -> dict[str, Any]:
    """A block's defaults (what an empty block normalizes to)."""
    return {name: copy.deepcopy(spec.default) for name, spec in fields.items() if spec.default is not REQUIRED}
