"""scoreboard: every variant's bench figures in one table, ``scoreboard.json`` (schema 2) and ``scoreboard.md``.

Cheap (no model is read): it only gathers the ``*.bench.json`` of every GGUF. Rows are keyed by the GGUF's digest,
so a row cannot outlive a rebuild of its file. With a healed variant the markdown table shows the seed's
"Raw merge | Healed | Delta" layout.

    python -m steps.scoreboard demo              # run the scoreboard stage of recipes/demo.yaml
"""
from __future__ import annotations

import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from steps import constants as C
from steps.store import read_json

if TYPE_CHECKING:
    from steps.store import Context

logger = logging.getLogger(__name__)


def build(ctx: Context) -> None:
    stage = ctx.stage
    variants: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for dep in stage.deps:
        rel = next(r for r in ctx.inputs[dep]["outputs"] if r.endswith(".json"))
        found = read_json(stage.build_dir / rel)
        if dep.startswith("eval:"):
            evals.append(found)
            continue
        variants.setdefault(found["variant"], found)
        rows += [{"variant": found["variant"], **row} for row in found["models"]]
    outtype = stage.recipe.gguf["outtype"].upper()
    for report in evals:
        qtype = report["name"][len(report["variant"]) + 1:]
        qtype = "base" if qtype == outtype else qtype
        row = next((r for r in rows if r["variant"] == report["variant"] and r["type"] == qtype), None)
        if row is None:
            row = {"variant": report["variant"], "type": qtype, "file": report["gguf"]}
            rows.append(row)
        row["eval"] = {k: report[k] for k in ("passed", "total", "categories", "tokens_per_s", "wall_s")}
    names = list(stage.params["variants"])
    first = next(iter(variants.values()), {})
    board = {"schema": C.SCOREBOARD_SCHEMA, "recipe": stage.recipe.name, "variants": names,
             "settings": first.get("settings"), "llama_cpp": first.get("llama_cpp"),
             "models": sorted(rows, key=lambda r: (names.index(r["variant"]), r["type"] != "base")),
             "by_digest": {r["digest"]: {"variant": r["variant"], "type": r["type"], "file": r["file"]}
                           for r in rows if "digest" in r}}
    (ctx.out / C.SCOREBOARD).write_text(json.dumps(board, indent=1) + "\n")
    (ctx.out / C.SCOREBOARD_MD).write_text(markdown(board))


def markdown(board: dict[str, Any]) -> str:
    """One column per variant (and a Delta column for two), one row per figure: PPL of the unquantized GGUF and of
    each quant, each quant's KL-divergence and same-top-token rate, and file sizes."""
    names = board["variants"]
    by = {(r["variant"], r["type"]): r for r in board["models"]}
    types = list(dict.fromkeys(r["type"] for r in board["models"]))
    header = ["Figure", *(_label(board["recipe"], v) for v in names)] + (["Delta"] if len(names) == 2 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    figures = [("PPL", "ppl", "{:.3f}"), ("KLD vs unquantized", "kld_mean", "{:.5f}"),
               ("same top token %", "same_top_p_percent", "{:.1f}"), ("size (MB)", "size", "{:.0f}")]
    for qtype in types:
        for label, key, fmt in figures:
            values = [by.get((v, qtype), {}).get(key) for v in names]
            if all(x is None for x in values):
                continue
            scale = 1e-6 if key == "size" else 1.0
            cells = [fmt.format(x * scale) if x is not None else "–" for x in values]
            if len(names) == 2:
                a, b = values
                cells.append(("{:+" + fmt[2:]).format((b - a) * scale) if a is not None and b is not None else "–")
            lines.append(f"| {'unquantized' if qtype == 'base' else qtype} {label} | " + " | ".join(cells) + " |")
    for qtype in types:
        reports = [by.get((v, qtype), {}).get("eval") for v in names]
        if all(r is None for r in reports):
            continue
        label = "unquantized" if qtype == "base" else qtype
        categories = list(dict.fromkeys(c for r in reports if r for c in r["categories"]))
        for category in [*categories, "TOTAL"]:
            counts = [(r["passed"], r["total"]) if r and category == "TOTAL" else
                      (r["categories"][category]["passed"], r["categories"][category]["total"])
                      if r and category in r["categories"] else None for r in reports]
            cells = [f"{c[0]}/{c[1]}" if c is not None else "–" for c in counts]
            if len(names) == 2:
                a, b = counts
                cells.append(f"{b[0] - a[0]:+d}" if a is not None and b is not None else "–")
            lines.append(f"| {label} {category} | " + " | ".join(cells) + " |")
        for key, text in (("tokens_per_s", "tokens/s"), ("wall_s", "eval wall time (s)")):
            cells = [f"{r[key]:.1f}" if r else "–" for r in reports]
            if len(names) == 2:
                cells.append(f"{reports[1][key] - reports[0][key]:+.1f}" if all(reports) else "–")
            lines.append(f"| {label} {text} | " + " | ".join(cells) + " |")
    return f"# {board['recipe']}: scoreboard\n\n" + "\n".join(lines) + "\n"


def _label(recipe: str, variant: str) -> str:
    return "raw merge" if variant == recipe else variant.removeprefix(recipe + "-")


if __name__ == "__main__":
    from steps.plan import find
    from steps.store import execute
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    execute(find(f"scoreboard:{sys.argv[1]}"))
