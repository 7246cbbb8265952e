"""scoreboard: every variant's bench and eval figures in one table: ``scoreboard.json`` (schema 3),
``scoreboard.md`` and ``scoreboard.png`` (score and KLD against file size).

Cheap (no model is read): it only gathers the ``*.bench.json`` and ``*.eval.json`` of every GGUF. Rows are keyed by
the GGUF's digest, so a row cannot outlive a rebuild of its file. The markdown table has the seed's layout: sources
evaluated beside the merge (``eval.sources``), "raw merge | healed | Delta".

    python -m steps.scoreboard demo              # run the scoreboard stage of recipes/demo.yaml
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps import constants as C
from steps.files import read_json
from steps.stage import Declaration

if TYPE_CHECKING:
    from steps.stage import Context

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
            row = {"variant": report["variant"], "type": qtype, "file": report["gguf"],
                   **{k: report[k] for k in ("digest", "size") if report.get(k) is not None}}
            rows.append(row)
        row["eval"] = {k: report[k] for k in ("passed", "total", "categories", "tokens_per_s", "wall_s")}
        row["eval"]["tool_calls"] = report.get("tool_calls", "text")
        row["eval"]["browser"] = report.get("browser")
        row["eval"]["tests"] = [{k: t[k] for k in ("id", "category", "passed", "reason", "latency_s")}
                                for t in report["tests"]]
    names = list(stage.params["variants"])
    first = next(iter(variants.values()), {})
    board = {"schema": C.SCOREBOARD_SCHEMA, "recipe": stage.recipe.name, "variants": names,
             "compare": stage.params.get("compare", []),
             "settings": first.get("settings"), "llama_cpp": first.get("llama_cpp"),
             "models": sorted(rows, key=lambda r: (names.index(r["variant"]), r["type"] != "base")),
             "by_digest": {r["digest"]: {"variant": r["variant"], "type": r["type"], "file": r["file"]}
                           for r in rows if "digest" in r}}
    board["chart"] = C.SCOREBOARD_PNG if chart(board, ctx.out / C.SCOREBOARD_PNG) else None
    (ctx.out / C.SCOREBOARD).write_text(json.dumps(board, indent=1) + "\n")
    (ctx.out / C.SCOREBOARD_MD).write_text(markdown(board))


def markdown(board: dict[str, Any]) -> str:
    """The seed's layout: one column per variant (sources evaluated beside the merge first, then the raw merge and
    the healed one) and a Delta column (healed - raw) when the recipe heals; one row per figure: PPL of the
    unquantized GGUF and of each quant, each quant's KL-divergence and same-top-token rate, file sizes, then each
    evaluated GGUF's passed/total per category, tokens/s and the eval's wall time."""
    names = board["variants"]
    compare = board.get("compare") or []
    delta = (compare[0], compare[1]) if len(compare) == 2 else None
    by = {(r["variant"], r["type"]): r for r in board["models"]}
    types = list(dict.fromkeys(r["type"] for r in board["models"]))
    header = ["Figure", *(_label(board["recipe"], v) for v in names)] + (["Delta"] if delta else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    figures = [("PPL", "ppl", "{:.3f}"), ("KLD vs unquantized", "kld_mean", "{:.5f}"),
               ("same top token %", "same_top_p_percent", "{:.1f}"), ("size (MB)", "size", "{:.0f}")]
    for qtype in types:
        for label, key, fmt in figures:
            values = {v: by.get((v, qtype), {}).get(key) for v in names}
            if all(x is None for x in values.values()):
                continue
            scale = 1e-6 if key == "size" else 1.0
            cells = [fmt.format(values[v] * scale) if values[v] is not None else "–" for v in names]
            if delta:
                a, b = values[delta[0]], values[delta[1]]
                cells.append(("{:+" + fmt[2:]).format((b - a) * scale) if a is not None and b is not None else "–")
            lines.append(f"| {_type_label(qtype)} {label} | " + " | ".join(cells) + " |")
    for qtype in types:
        reports = {v: by.get((v, qtype), {}).get("eval") for v in names}
        if all(r is None for r in reports.values()):
            continue
        categories = list(dict.fromkeys(c for r in reports.values() if r for c in r["categories"]))
        for category in [*categories, "TOTAL"]:
            counts = {v: (r["passed"], r["total"]) if r and category == "TOTAL" else
                      (r["categories"][category]["passed"], r["categories"][category]["total"])
                      if r and category in r["categories"] else None for v, r in reports.items()}
            cells = [f"{c[0]}/{c[1]}" if (c := counts[v]) is not None else "–" for v in names]
            if delta:
                a, b = counts[delta[0]], counts[delta[1]]
                cells.append(f"{b[0] - a[0]:+d}" if a is not None and b is not None else "–")
            lines.append(f"| {_type_label(qtype)} {category} | " + " | ".join(cells) + " |")
            lines += _other_count(qtype, category, reports, names, delta)
        for key, text in (("tokens_per_s", "tokens/s"), ("wall_s", "eval wall time (s)")):
            cells = [f"{r[key]:.1f}" if (r := reports[v]) else "–" for v in names]
            if delta:
                a, b = reports[delta[0]], reports[delta[1]]
                cells.append(f"{b[key] - a[key]:+.1f}" if a and b else "–")
            lines.append(f"| {_type_label(qtype)} {text} | " + " | ".join(cells) + " |")
    chart = f"\n![score and KLD against file size]({C.SCOREBOARD_PNG})\n" if board.get("chart") else ""
    return f"# {board['recipe']}: scoreboard\n\n" + "\n".join(lines) + "\n" + chart


def _other_count(qtype: str, category: str, reports: dict[str, Any], names: list[str],
                 delta: tuple[str, str] | None) -> list[str]:
    """The row of a category counted the other way, where it differs for some variant: with only the API's
    tool_calls when the eval counted calls written in the text too, and the other way round (a GGUF whose chat
    template or tool parser is broken passes by its text calls only)."""
    if category == "TOTAL":
        return []
    other: dict[str, tuple[int, int] | None] = {}
    label = ""
    for v, r in reports.items():
        c = (r or {}).get("categories", {}).get(category)
        if not r or not c or "api" not in c:
            other[v] = None
            continue
        counted = r.get("tool_calls", "text")
        label = "API tool_calls only" if counted == "text" else "text calls counted too"
        other[v] = (c["api"] if counted == "text" else c["text"], c["total"])
    if all(o is None or o[0] == reports[v]["categories"][category]["passed"] for v, o in other.items()):
        return []
    cells = [f"{o[0]}/{o[1]}" if (o := other[v]) is not None else "–" for v in names]
    if delta:
        a, b = other[delta[0]], other[delta[1]]
        cells.append(f"{b[0] - a[0]:+d}" if a is not None and b is not None else "–")
    return [f"| {_type_label(qtype)} {category} ({label}) | " + " | ".join(cells) + " |"]


def chart(board: dict[str, Any], dest: Path) -> bool:
    """``scoreboard.png``: capability score (% of tests passed) and KL-divergence against GGUF file size, one point
    per GGUF, one colour per variant. False (nothing written) when there is nothing to plot."""
    rows = [r for r in board["models"] if r.get("size")]
    scored = [r for r in rows if r.get("eval")]
    diverged = [r for r in rows if r.get("kld_mean") is not None]
    if not scored and not diverged:
        return False
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    panels = [(scored, "tests passed (%)", lambda r: 100.0 * r["eval"]["passed"] / max(1, r["eval"]["total"])),
              (diverged, "KLD vs the unquantized GGUF", lambda r: r["kld_mean"])]
    gb = max(r["size"] for r in rows) >= 1e9
    unit, scale = ("GB", 1e9) if gb else ("MB", 1e6)
    panels = [p for p in panels if p[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), dpi=100, squeeze=False)
    colours = {v: f"C{i}" for i, v in enumerate(board["variants"])}
    markers = {v: ("o", "s", "^", "D", "v")[i % 5] for i, v in enumerate(board["variants"])}   # ties stay visible
    sizes = {v: 9 - 1.5 * (i % 4) for i, v in enumerate(board["variants"])}
    for ax, (found, ylabel, value) in zip(axes[0], panels, strict=True):
        for variant in board["variants"]:
            points = sorted((r["size"] / scale, value(r), _type_label(r["type"])) for r in found
                            if r["variant"] == variant)
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=markers[variant],
                    markersize=sizes[variant], color=colours[variant], label=_label(board["recipe"], variant))
            for x, y, text in points:
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"GGUF size ({unit})")
        ax.set_ylabel(ylabel)
        ax.ticklabel_format(useOffset=False, style="plain", axis="x")
        if found is scored:
            ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{board['recipe']}: score and KLD against file size")
    fig.tight_layout()
    fig.savefig(dest, metadata={"Software": None})
    plt.close(fig)
    return True


def _label(recipe: str, variant: str) -> str:
    if variant == recipe:
        return "raw merge"
    rest = variant.removeprefix(recipe)
    return f"source {rest.removeprefix(C.SOURCE_INFIX)}" if rest.startswith(C.SOURCE_INFIX) else rest.lstrip("-")


def _type_label(qtype: str) -> str:
    return "unquantized" if qtype == "base" else qtype


STAGE = Declaration(build=build)


if __name__ == "__main__":
    from steps.plan import find
    from steps.store import execute
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    execute(find(f"scoreboard:{sys.argv[1]}"))
