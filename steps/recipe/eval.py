"""The recipe's eval: block, declared as data: which GGUFs (and which sources beside the merge) run the capability
suite, which categories and tests, the sampling and caps, and the llama-server options."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from steps.evalsuite import CATEGORIES, all_tests
from steps.recipe.fields import Checker, Field
from steps.server import LAUNCH_ONLY, SERVER_DEFAULTS

EVAL = {
    "ggufs":         Field("any"),                  # default: every quant of the recipe
    "sources":       Field("any", []),
    "categories":    Field("any"),
    "tests":         Field("any"),
    "max_tokens":    Field("any"),                  # each test's answer cap: one number, or {test or category: n}
    "samples":       Field("int", 1, lo=1, hi=1000),
    "temperature":   Field("number", 0.0, lo=0, hi=2, as_float=False),
    "seed":          Field("int", 0),
    "repeatable":    Field("bool", True),           # one request at a time: the same bytes give the same eval.json
    "timeout_s":     Field("int", 300, lo=1),
    "needle_tokens": Field("int", 4096, lo=1),
    "thinking":      Field("any", "auto"),          # auto | off | on | a thinking budget in tokens
    "sandbox":       Field("choice", "auto", choices=("auto", "bwrap", "rlimits"), noun="sandbox mode",
                           hint="(auto: bubblewrap, else generated code is not run; rlimits: run it without "
                                "filesystem and network isolation)"),
    "tool_calls":    Field("choice", "api", choices=("api", "text"), noun="tool-call source",
                           hint="(api: only the API's tool_calls count; text: calls written in the reply count too)"),
    "server":        Field("any", {}),
}
SERVER = {                                          # llama-server's options; their defaults: steps.server
    "context":          Field("int", lo=1),
    "flash_attn":       Field("choice", choices=("on", "off", "auto"), yaml_bools=("off", "on")),
    "batch":            Field("int", lo=1),
    "ubatch":           Field("int", lo=1),
    "parallel":         Field("int", lo=1),
    "cache_type_k":     Field("any"),
    "cache_type_v":     Field("any"),
    "jinja":            Field("any"),
    "alias":            Field("any"),
    "chat_template":    Field("any"),               # a Jinja file, relative to the recipe
    "reasoning_budget": Field("any"),
    "reasoning_format": Field("choice", choices=("auto", "none", "deepseek", "deepseek-legacy"),
                              noun="reasoning format",
                              hint="(auto/deepseek: thinking apart as reasoning_content; none: left in the content)"),
    "url":              Field("str"),               # an already running OpenAI-compatible server: none is started
    "api_key_env":      Field("str"),               # the environment variable holding its API key
}
assert set(SERVER) == set(SERVER_DEFAULTS), "steps.server's options and the eval.server schema differ"


def validate(check: Checker, value: Any, base: Path, quantize: tuple[str, ...], outtype: str,
             sources: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Path]]:
    """The recipe's ``eval:`` block, normalized (every default filled), and its files (a chat template).
    ``sources``: source models converted, quantized (to the evaluated quants), benched and evaluated the same way, so
    the scoreboard can show them beside the merge."""
    given = check.mapping(value if value is not None else {}, "eval", tuple(EVAL))
    out = check.block(given, "eval", EVAL)
    if "ggufs" not in given:
        out["ggufs"] = list(quantize)
    choices = (*quantize, outtype.upper())
    if not isinstance(out["ggufs"], list) or not all(isinstance(g, str) for g in out["ggufs"]):
        raise check.fail("eval.ggufs", f"expected a list of GGUF names from {', '.join(choices)}")
    out["ggufs"] = [g.upper() if g.upper() in (c.upper() for c in choices) else g for g in out["ggufs"]]
    for i, name in enumerate(out["ggufs"]):
        if name not in choices:
            raise check.fail(f"eval.ggufs[{i}]", f"{name!r} is not a GGUF of this recipe; one of {', '.join(choices)}")
    if not isinstance(out["sources"], list) or not all(isinstance(x, str) for x in out["sources"]):
        raise check.fail("eval.sources", "expected a list of source names")
    for i, name in enumerate(out["sources"]):
        if name not in sources:
            raise check.fail(f"eval.sources[{i}]", f"{name!r} is not a source of this recipe; one of "
                             f"{', '.join(sources)}")
    if len(set(out["sources"])) != len(out["sources"]):
        raise check.fail("eval.sources", "a source is listed twice")
    for key, known in (("categories", CATEGORIES), ("tests", None)):
        if out[key] is not None:
            if not isinstance(out[key], list) or not out[key] or not all(isinstance(x, str) for x in out[key]):
                raise check.fail(f"eval.{key}", "expected a non-empty list of names")
            for i, name in enumerate(out[key]):
                if known is not None and name not in known:
                    raise check.fail(f"eval.{key}[{i}]", f"unknown category {name!r}; one of {', '.join(known)}")
    if out["tests"] is not None:
        try:
            all_tests(out["categories"], out["tests"])
        except ValueError as exc:
            raise check.fail("eval.tests", str(exc)) from None
    out["max_tokens"] = _caps(check, out["max_tokens"])
    out["thinking"] = _thinking(check, out["thinking"])
    if out["samples"] > 1 and out["temperature"] == 0:
        raise check.fail("eval.samples", f"{out['samples']} samples at temperature 0 are one greedy draw "
                         "repeated; set eval.temperature (e.g. 0.7) to draw them, or samples: 1")
    server = check.block(out["server"] or {}, "eval.server", SERVER, fill=False)
    if server.get("url") is not None:
        if not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", server["url"]):
            raise check.fail("eval.server.url", f"expected http://host:port of a running OpenAI-compatible server "
                             f"(llama-server, vLLM, SGLang), got {server['url']!r}")
        server["url"] = server["url"].rstrip("/").removesuffix("/v1")
        for key in LAUNCH_ONLY:
            if key in server:
                raise check.fail(f"eval.server.{key}", "sets up the llama-server the stage starts; with "
                                 "eval.server.url the server runs elsewhere: set it there, and drop it here")
    if server.get("api_key_env") is not None:
        if server.get("url") is None:
            raise check.fail("eval.server.api_key_env", "names the API key of a server at eval.server.url; the "
                             "server the stage starts needs none")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", server["api_key_env"]):
            raise check.fail("eval.server.api_key_env", f"expected the name of an environment variable (e.g. "
                             f"VLLM_API_KEY), not the key itself, got {server['api_key_env']!r}")
    files = {}
    if server.get("chat_template"):
        files["chat_template"] = check.existing_file(server["chat_template"], "eval.server.chat_template", base)
    out["server"] = server
    return out, files


THINKING_BUDGET = 2048       # thinking tokens allowed on top of each answer cap (thinking: on, or auto on a template
                             # that thinks)


def _caps(check: Checker, value: Any) -> int | dict[str, int] | None:
    """eval.max_tokens: None (each test's own cap), one cap for every test, or caps by test id or category (a test's
    id before its category); a cap raises a test's own as well as lowers it."""
    def cap(v: Any, key: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise check.fail(key, f"expected a positive integer (tokens of answer), got {v!r}")
        return v
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return None if value is None else cap(value, "eval.max_tokens")
    if not isinstance(value, dict):
        raise check.fail("eval.max_tokens", f"expected a number or a mapping of test ids and categories to "
                         f"numbers, got {type(value).__name__}")
    ids = {t.id for t in all_tests(CATEGORIES)}
    for name in value:
        if name not in ids and name not in CATEGORIES:
            raise check.fail(f"eval.max_tokens.{name}", f"{name!r} is neither a test id nor a category; categories: "
                             f"{', '.join(CATEGORIES)}")
    return {str(k): cap(v, f"eval.max_tokens.{k}") for k, v in value.items()}


def _thinking(check: Checker, value: Any) -> str | int:
    """eval.thinking: auto (what the model's chat template does), off, on, or a thinking budget in tokens."""
    if value is True or value is False:          # YAML reads on/off as booleans
        return "on" if value else "off"
    if isinstance(value, int) and value >= 1:
        return value
    if value in ("auto", "on", "off"):
        return str(value)
    raise check.fail("eval.thinking", f"expected auto, off, on or a thinking budget in tokens (a positive integer), "
                     f"got {value!r}")
