"""Reading model output: reasoning blocks, fenced code, tool calls written in the text, markdown tables, answers."""
from __future__ import annotations

import json
import re
from typing import Any

_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.S)
_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([^\s`]*)[^\n]*$", re.M)


def strip_thinking(content: str) -> str:
    """Content without ``<think>...</think>`` blocks (and, when only a closing tag is there, what precedes it)."""
    if "</think>" in content and "<think>" not in content:
        content = content.split("</think>", 1)[1]
    return _THINK.sub("", content).strip()


def clip(value: str, limit: int = 160) -> str:
    """A one-line excerpt for a reason."""
    value = " ".join(value.split())
    return value if len(value) <= limit else value[:limit] + "..."


def code_blocks(text: str) -> list[tuple[str, str]]:
    """Every fenced block as (language, code); a fence left open runs to the end of the text."""
    blocks, pos = [], 0
    while (opening := _FENCE.search(text, pos)) is not None:
        fence, lang = opening.group(1), opening.group(2).lower()
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", re.M)
        end = closing.search(text, opening.end())
        body = text[opening.end() + 1:end.start() if end else len(text)]
        blocks.append((lang, body.rstrip("\n") + "\n"))
        if end is None:
            break
        pos = end.end()
    return blocks


def code_block(text: str, languages: tuple[str, ...]) -> str | None:
    """The first fenced block in one of ``languages``, else the first fenced block of any kind, else None."""
    blocks = code_blocks(text)
    for lang, code in blocks:
        if lang in languages:
            return code
    return blocks[0][1] if blocks else None


def _call(value: Any) -> tuple[str, str] | None:
    """(name, JSON arguments) of a {"name": ..., "arguments" | "parameters": {...}} object."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    return value["name"], args if isinstance(args, str) else json.dumps(args)


def _json_calls(body: str) -> list[tuple[str, str]]:
    """Calls in a JSON object or list; a body that is not JSON gives its "name" with the raw body as arguments."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        name = re.search(r'"name"\s*:\s*"([^"]+)"', body)
        return [(name.group(1), body)] if name else []
    return [c for c in map(_call, _as_list(value)) if c is not None]


def _xml_call(body: str) -> tuple[str, str] | None:
    """``<function=NAME><parameter=KEY>VALUE</parameter>...</function>`` (the Qwen3 XML form)."""
    name = re.search(r"<function=([^>\s]+)>", body)
    if name is None:
        return None
    args: dict[str, Any] = {}
    for key, raw in re.findall(r"<parameter=([^>\s]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", body, re.S):
        try:
            args[key] = json.loads(raw.strip())
        except json.JSONDecodeError:
            args[key] = raw.strip()
    return name.group(1), json.dumps(args)


def text_tool_calls(text: str) -> list[tuple[str, str]]:
    """Tool calls a model wrote as text: ``<tool_call>{json}</tool_call>`` or ``<tool_call><function=...>``,
    ``[TOOL_CALLS][...]``, or a reply that is nothing but a JSON call (fenced or not)."""
    tagged = re.findall(r"<tool_call>(.*?)(?:</tool_call>|(?=<tool_call>)|\Z)", text, re.S)
    if tagged:
        calls: list[tuple[str, str]] = []
        for body in tagged:
            xml = _xml_call(body)
            calls.extend([xml] if xml else _json_calls(body.strip()))
        return calls
    if "[TOOL_CALLS]" in text:
        return _json_calls(text.split("[TOOL_CALLS]", 1)[1].strip())
    blocks = code_blocks(text)
    whole = blocks[0][1] if len(blocks) == 1 and text.startswith(("```", "~~~")) else text
    if whole.strip().startswith(("{", "[")):
        try:
            return [c for c in map(_call, _as_list(json.loads(whole))) if c is not None]
        except json.JSONDecodeError:
            return []
    return []


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def markdown_table(text: str) -> list[list[str]] | None:
    """The first markdown table: its header and body rows as lists of cell texts (the separator row dropped)."""
    lines = [line.strip() for line in text.splitlines()]
    for i in range(len(lines) - 1):
        if "|" in lines[i] and re.fullmatch(r"\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?", lines[i + 1]):
            rows = [lines[i]]
            for line in lines[i + 2:]:
                if "|" not in line:
                    break
                rows.append(line)
            return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    return None


def answer(text: str) -> str | None:
    """What follows the last ``Answer:`` (markdown emphasis allowed), on its line."""
    found = re.findall(r"answer\W{0,3}:\W{0,3}([^\n]*)", text, re.I)
    return found[-1].strip(" *_`.") if found else None


def number(text: str) -> float | None:
    """The last number in the text (thousands separators allowed)."""
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return float(found[-1].replace(",", "")) if found else None


def first_number(text: str) -> float | None:
    """The first number in the text (thousands separators allowed): the value an answer line of the form
    ``Answer: <number>`` gives, before any words after it ("627 dollars over 2 days")."""
    found = re.search(r"-?\d[\d,]*(?:\.\d+)?", text)
    return float(found.group(0).replace(",", "").rstrip(",")) if found else None


def has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.I) is not None
