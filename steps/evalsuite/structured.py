"""structured: JSON validated against a JSON Schema, and a markdown table parsed cell by cell."""
from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

from steps.evalsuite.core import Grade, Reply, Test, fail, ok, register
from steps.evalsuite.text import clip, code_block, markdown_table

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "age": {"type": "integer", "minimum": 0},
        "city": {"type": "string"},
        "email": {"type": "string", "pattern": "^[^@\\s]+@[^@\\s]+\\.[a-z]+$"},
        "languages": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "employed": {"type": "boolean"}},
    "required": ["name", "age", "city", "email", "languages", "employed"],
    "additionalProperties": False}


def _json(text: str) -> Any:
    """The reply's JSON value: the whole text, a fenced block, or the outermost {...}; ValueError if none."""
    outermost = re.search(r"\{.*\}", text, re.S)
    candidates = [text, code_block(text, ("json",)) or "", outermost.group(0) if outermost else ""]
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    raise ValueError(f"no JSON value in {clip(text)!r}")


def _person(reply: Reply) -> Grade:
    try:
        value = _json(reply.text)
    except ValueError as e:
        return fail(str(e))
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(PERSON).iter_errors(value))
    if error is not None:
        return fail(f"schema: {'/'.join(map(str, error.absolute_path)) or 'value'}: {error.message}")
    expected = {"name": "maria keller", "age": 34, "city": "zurich", "email": "maria.keller@example.org",
                "languages": ["go", "python", "rust"], "employed": True}
    got = {**value, "name": value["name"].lower(), "city": value["city"].lower().replace("ü", "u"),
           "email": value["email"].lower(), "languages": sorted(x.lower() for x in value["languages"])}
    wrong = [f"{key}={value[key]!r}" for key in expected if got[key] != expected[key]]
    return fail("valid JSON, wrong values: " + ", ".join(wrong)) if wrong else ok("valid against the schema, values "
                                                                                   "right")


register(Test("json_schema", "structured", [{"role": "user", "content": (
    "Extract the person below into one JSON object with exactly these keys: name (string), age (integer), city "
    "(string), email (string), languages (array of the programming languages she uses), employed (boolean). Reply "
    "with the JSON only.\n\n"
    "Maria Keller, 34, is a data engineer from Zurich. She writes Python and Rust every day and reads Go when she "
    "has to. She works for a logistics company. Contact: maria.keller@example.org")}],
    _person, response_format={"type": "json_object"}, max_tokens=256))

PLANETS = [("mercury", 1, 0), ("venus", 2, 0), ("earth", 3, 1), ("mars", 4, 2)]


def _table(reply: Reply) -> Grade:
    table = markdown_table(reply.text)
    if table is None:
        return fail(f"no markdown table (header, |---| separator, rows) in {clip(reply.text)!r}")
    header, rows = [c.lower() for c in table[0]], table[1:]
    if len(header) != 3 or "planet" not in header[0] or "order" not in header[1] or "moons" not in header[2]:
        return fail(f"columns are {table[0]}, expected Planet | Order from the Sun | Moons")
    if len(rows) != 4:
        return fail(f"{len(rows)} rows, expected 4")
    for row, (planet, order, moons) in zip(rows, PLANETS, strict=True):
        cells = [c.strip("* ").lower() for c in row]
        if cells != [planet, str(order), str(moons)]:
            return fail(f"row {row} should be {planet.title()} | {order} | {moons}")
    return ok("table parsed: 3 columns, 4 rows, every cell right")


register(Test("markdown_table", "structured", [{"role": "user", "content": (
    "Make a markdown table with the columns Planet | Order from the Sun | Moons for the four inner planets, "
    "nearest to the Sun first. Use digits for the numbers. Reply with the table only.")}], _table, max_tokens=256))
