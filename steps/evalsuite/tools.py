"""tools: function calls, read from the API's ``tool_calls`` or, failing that, from the text (``<tool_call>``...).

Every call's arguments are validated with ``jsonschema`` against the tool's declared parameters.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jsonschema

from steps.evalsuite.core import Grade, Message, Reply, Test, ToolCall, fail, ok, register
from steps.evalsuite.text import clip, has_word


def function(name: str, description: str, properties: dict[str, Any], required: Sequence[str] = ()) -> Message:
    """An OpenAI function tool schema."""
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(required), "additionalProperties": False}}}


def expect_call(call: ToolCall, tools: Sequence[Message], name: str) -> dict[str, Any] | Grade:
    """The call's arguments when it calls ``name`` with arguments valid for its schema, else the failing Grade."""
    if call.name != name:
        return fail(f"called {call.name!r} ({call.source}), expected {name!r}")
    try:
        args = call.args()
    except ValueError as e:
        return fail(str(e))
    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == name)
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(args))
    if error is not None:
        where = "/".join(map(str, error.absolute_path)) or "arguments"
        return fail(f"{name} {where}: {error.message}")
    return args


def first_call(reply: Reply, tools: Sequence[Message], name: str) -> tuple[dict[str, Any], str] | Grade:
    """(arguments, source) of the reply's first call, which must be a valid call of ``name``."""
    calls = reply.calls()
    if not calls:
        return fail(f"no tool call (neither tool_calls nor a call in the text): {clip(reply.text)!r}")
    args = expect_call(calls[0], tools, name)
    return args if isinstance(args, Grade) else (args, calls[0].source)


def _is(value: Any, *names: str) -> bool:
    return isinstance(value, str) and any(has_word(value, n) for n in names)


WEATHER = function("get_weather", "Current weather for a city.", {
    "city": {"type": "string", "description": "City name, e.g. 'Berlin'"},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"}}, ["city"])
STOCK = function("get_stock_price", "Latest price of a stock.", {
    "symbol": {"type": "string", "description": "Ticker symbol, e.g. 'AAPL'"}}, ["symbol"])
FLIGHTS = function("search_flights", "Search flights between two cities.", {
    "origin": {"type": "string", "description": "Departure city or IATA code"},
    "destination": {"type": "string", "description": "Arrival city or IATA code"},
    "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$", "description": "Departure date, YYYY-MM-DD"},
    "passengers": {"type": "integer", "minimum": 1, "description": "Number of travellers (default 1)"},
    "cabin": {"type": "string", "enum": ["economy", "premium_economy", "business", "first"],
              "description": "Cabin class (default economy)"}}, ["origin", "destination", "date"])
CURRENCY = function("convert_currency", "Convert an amount of money between currencies at today's rate.", {
    "amount": {"type": "number"},
    "from_currency": {"type": "string", "pattern": "^[A-Z]{3}$", "description": "ISO 4217 code, e.g. 'GBP'"},
    "to_currency": {"type": "string", "pattern": "^[A-Z]{3}$", "description": "ISO 4217 code"}},
    ["amount", "from_currency", "to_currency"])
TIME = function("get_time", "Current local time in a time zone.", {
    "timezone": {"type": "string", "description": "IANA time zone, e.g. 'Asia/Tokyo'"}}, ["timezone"])
EVENT = function("create_event", "Create a calendar event.", {
    "title": {"type": "string"},
    "attendees": {"type": "array", "items": {"type": "string", "pattern": "^[^@\\s]+@[^@\\s]+$"}, "minItems": 1,
                  "description": "Attendee e-mail addresses"},
    "priority": {"type": "string", "enum": ["low", "normal", "high"]},
    "reminders_minutes": {"type": "array", "items": {"type": "integer", "minimum": 0},
                          "description": "Reminders, in minutes before the start"}}, ["title", "attendees", "priority"])


def _user(prompt: str) -> list[Message]:
    return [{"role": "user", "content": prompt}]


def _single(reply: Reply) -> Grade:
    found = first_call(reply, [WEATHER], "get_weather")
    if isinstance(found, Grade):
        return found
    (args, source), calls = found, reply.calls()
    if len(calls) != 1:
        return fail(f"{len(calls)} calls, expected one")
    if not _is(args["city"], "Lisbon", "Lisboa"):
        return fail(f"city is {args['city']!r}, expected Lisbon")
    return ok(f"get_weather(city={args['city']!r}) via {source}")


register(Test("single_call", "tools", _user("What's the weather like in Lisbon right now?"), _single,
              tools=[WEATHER], max_tokens=256))


def _optional(reply: Reply) -> Grade:
    found = first_call(reply, [FLIGHTS], "search_flights")
    if isinstance(found, Grade):
        return found
    args, source = found
    checks = {"origin": _is(args["origin"], "Paris", "CDG", "ORY", "PAR"),
              "destination": _is(args["destination"], "Tokyo", "NRT", "HND", "TYO"),
              "date": args["date"] == "2026-03-14", "passengers": args.get("passengers") == 2,
              "cabin": args.get("cabin") == "business"}
    wrong = [f"{key}={args.get(key)!r}" for key, good in checks.items() if not good]
    if wrong:
        return fail("wrong or missing: " + ", ".join(wrong))
    return ok(f"search_flights with passengers=2, cabin=business via {source}")


register(Test("optional_parameters", "tools",
              _user("Find business class flights from Paris to Tokyo on 14 March 2026 for two people."), _optional,
              tools=[FLIGHTS], max_tokens=256))


def _no_call(reply: Reply) -> Grade:
    calls = reply.calls()
    if calls:
        return fail(f"called {calls[0].name!r} ({calls[0].source}) for plain arithmetic")
    if not re.search(r"(?<!\d)144(?!\d)", reply.text):
        return fail(f"no 144 in {clip(reply.text)!r}")
    return ok("answered 144 without a tool")


register(Test("no_call_needed", "tools", _user("What is 12 multiplied by 12?"), _no_call, tools=[WEATHER, STOCK],
              max_tokens=256))


def _choice(reply: Reply) -> Grade:
    found = first_call(reply, [WEATHER, CURRENCY, TIME], "convert_currency")
    if isinstance(found, Grade):
        return found
    args, source = found
    got = (args["amount"], args["from_currency"], args["to_currency"])
    if got != (250, "USD", "EUR"):
        return fail(f"convert_currency{got}, expected (250, 'USD', 'EUR')")
    return ok(f"convert_currency(250, USD, EUR) via {source}")


register(Test("tool_choice", "tools", _user("How much is 250 US dollars in euros today?"), _choice,
              tools=[WEATHER, CURRENCY, TIME], max_tokens=256))


def _arrays(reply: Reply) -> Grade:
    found = first_call(reply, [EVENT], "create_event")
    if isinstance(found, Grade):
        return found
    args, source = found
    wrong = []
    if sorted(a.lower() for a in args["attendees"]) != ["ana@example.com", "li@example.com"]:
        wrong.append(f"attendees={args['attendees']!r}")
    if args["priority"] != "high":
        wrong.append(f"priority={args['priority']!r}")
    if sorted(args.get("reminders_minutes", [])) != [10, 30]:
        wrong.append(f"reminders_minutes={args.get('reminders_minutes')!r}")
    if "quarterly review" not in args["title"].lower():
        wrong.append(f"title={args['title']!r}")
    if wrong:
        return fail("wrong: " + ", ".join(wrong))
    return ok(f"create_event with both arrays and the enum via {source}")


register(Test("arrays_enums", "tools", _user(
    "Create a high-priority calendar event titled 'Quarterly review' with ana@example.com and li@example.com, "
    "with reminders 30 minutes and 10 minutes before it starts."), _arrays, tools=[EVENT], tool_choice="required",
    max_tokens=256))


def _uses_result(reply: Reply) -> Grade:
    calls = reply.calls()
    if calls:
        return fail(f"called {calls[0].name!r} again instead of using the result")
    if not re.search(r"(-|−|minus )7(?!\d)", reply.text):
        return fail(f"does not state the -7 °C from the tool result: {clip(reply.text)!r}")
    if "snow" not in reply.text.lower():
        return fail(f"does not mention the snow from the tool result: {clip(reply.text)!r}")
    return ok("answered from the tool result (-7, snow)")


register(Test("tool_result", "tools", [
    {"role": "user", "content": "Do I need a warm coat in Oslo today? Mention the temperature and conditions."},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1",
     "content": '{"city": "Oslo", "temperature": -7, "unit": "celsius", "condition": "light snow", "wind_kmh": 25}'}],
    _uses_result, tools=[WEATHER], max_tokens=256))
