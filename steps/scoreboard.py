"""scoreboard: every variant's bench and eval figures in one table: ``scoreboard.json`` (schema 4),
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
        outputs = ctx.inputs[dep]["outputs"]
        if dep.startswith("eval:"):
            found = read_json(stage.build_dir / next(r for r in outputs if r.endswith(".eval.json")))
            timings = next((r for r in outputs if r.endswith(".timings.json")), None)
            found["timings"] = read_json(stage.build_dir / timings) if timings else {}
            evals.append(found)
            continue
        found = read_json(stage.build_dir / next(r for r in outputs if r.endswith(".json")))
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
        row["eval"] = {k: report.get(k) for k in ("passed", "total", "statuses", "verdicts", "rate", "interval",
                                                  "samples", "categories", "tool_calls", "thinking", "sandbox",
                                                  "browser")}
        row["eval"].update({k: report["timings"].get(k) for k in ("tokens_per_s", "wall_s")})
        row["eval"]["tests"] = [{k: t.get(k) for k in ("id", "category", "status", "reason", "rate", "finish_reason",
                                                       "thinking_tokens", "answer_tokens")}
                                for t in report["tests"]]
    names = list(stage.params["variants"])
    first = next(iter(variants.values()), {})
    board = {"schema": C.SCOREBOARD_SCHEMA, "recipe": stage.recipe.name, "variants": names,
             "compare": stage.params.get("compare", []),
             "settings": first.get("settings"), "llama_cpp": first.get("llama_cpp"),
             "models": sorted(rows, key=lambda r: (names.index(r["variant"]), r["type"] != "base")),
             "by_digest": {r["digest"]: {"variant": r["variant"], "type": r["type"], "file": r["file"]}
                           for r in rows if "digest" in r}}
    if stage.params.get("gates"):
        board["gates"] = stage.params["gates"]
        judge(board)
    if stage.params.get("cells"):
        board["rank"] = stage.params["rank"]
        board["cells"] = rank_cells(board, stage.params["cells"], stage.params["rank"])
    board["chart"] = C.SCOREBOARD_PNG if chart(board, ctx.out / C.SCOREBOARD_PNG) else None
    (ctx.out / C.SCOREBOARD).write_text(json.dumps(board, indent=1) + "\n")
    (ctx.out / C.SCOREBOARD_MD).write_text(markdown(board))


def rank_cells(board: dict[str, Any], cells: list[dict[str, Any]], rank: dict[str, Any]) -> list[dict[str, Any]]:
    """A sweep's cells, each with its settings, the figures of its ranked GGUF (``rank.gguf`` of ``rank.variant``)
    and its ``rank`` (1 = best) by ``rank.by`` in order: the score higher, PPL, KLD and size lower; a figure not
    measured ranks last. Cells equal on every figure share a rank. Each cell's score is compared with the best
    cell's (``vs_best``: the difference in points with its 95 % interval, ``within_noise`` when it holds 0)."""
    from steps.evalsuite.scores import difference
    by = {(r["variant"], r["type"]): r for r in board["models"]}
    found, tallies = [], {}
    for cell in cells:
        bench = by.get((cell.get("bench"), cell["type"]), {})
        scored = (by.get((cell.get("eval"), cell["type"])) or {}).get("eval")
        figures: dict[str, Any] = {"ppl": bench.get("ppl"), "kld": bench.get("kld_mean"),
                                   "size": bench.get("size") or (by.get((cell.get("eval"), cell["type"])) or {})
                                   .get("size")}
        if scored:
            figures["score"] = {k: scored.get(k) for k in ("passed", "total", "verdicts", "statuses", "rate",
                                                           "interval")}
            figures["categories"] = {c: {"passed": t["passed"], "total": t["total"]}
                                     for c, t in scored["categories"].items()}
        row = {"name": cell["name"], "settings": cell["settings"], "gguf": cell["gguf"],
               "variant": cell.get("eval") or cell.get("bench"), **figures}
        tallies[cell["name"]] = scored
        found.append(row)

    def order(row: dict[str, Any]) -> tuple[float, ...]:
        inf = float("inf")
        keys = []
        for figure in rank["by"]:
            if figure == "score":
                rate = (row.get("score") or {}).get("rate")
                keys.append(-rate if rate is not None else inf)
            else:
                keys.append(row[figure] if row.get(figure) is not None else inf)
        return tuple(keys)

    ranked = sorted(found, key=order)
    for i, row in enumerate(ranked):
        row["rank"] = ranked[i - 1]["rank"] if i and order(row) == order(ranked[i - 1]) else i + 1
    best = tallies[ranked[0]["name"]]
    for row in found:
        mine = tallies[row["name"]]
        row["vs_best"] = difference(best, mine) if best and mine and row["rank"] != 1 else None
    return sorted(found, key=lambda r: r["rank"])


def _cells_markdown(board: dict[str, Any]) -> list[str]:
    """The cells side by side, best first: rank, settings, score with interval (and how far from the best, marked
    within noise when the difference's interval holds 0), each category, PPL, KLD and size."""
    cells = board["cells"]
    rank = board["rank"]
    paths = list(dict.fromkeys(p for c in cells for p in c["settings"]))
    categories = list(dict.fromkeys(k for c in cells for k in c.get("categories") or {}))
    header = ["rank", "cell", *paths, "passes/verdicts (95 %)", "vs best", *(f"{k} passed" for k in categories),
              "PPL", "KLD", "size (MB)"]
    lines = ["", f"## Cells: {rank['gguf']} of the {rank['variant']} model, ranked by {', '.join(rank['by'])}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in cells:
        s = c.get("score")
        score = _score_cell(s, with_rate=True) if s and s.get("verdicts") is not None else "–"
        d = c.get("vs_best")
        versus = "**best**" if c["rank"] == 1 else (
            f"{100 * d['delta']:+.0f} pts" + (" (within noise)" if d["within_noise"] else "") if d else "–")
        cats = [f"{t['passed']}/{t['total']}" if (t := (c.get("categories") or {}).get(k)) else "–"
                for k in categories]
        values = [json.dumps(c["settings"][p]) if p in c["settings"] else "(recipe)" for p in paths]
        lines.append("| " + " | ".join([str(c["rank"]), c["name"], *values, score, versus, *cats,
                                        f"{c['ppl']:.3f}" if c.get("ppl") is not None else "–",
                                        f"{c['kld']:.5f}" if c.get("kld") is not None else "–",
                                        f"{c['size'] / 1e6:.0f}" if c.get("size") else "–"]) + " |")
    return lines


def judge(board: dict[str, Any]) -> None:
    """Each row's ``gates``: every gate of the recipe that applies to it, with its figure, the threshold and
    ``passed`` (None: the figure was not measured, which a publish treats as not passed). PPL ratio, KLD and the
    same-top rate apply to quants (the unquantized GGUF is what they are measured against); the scores to every
    GGUF, once evaluated. ``shippable``: every applicable gate measured and passed."""
    gates = board["gates"]
    by = {(r["variant"], r["type"]): r for r in board["models"]}
    for row in board["models"]:
        base = by.get((row["variant"], "base"), {})
        results = []
        for gate, threshold in gates.items():
            if gate in ("ppl_ratio_max", "kld_mean_max", "same_top_min") and row["type"] == "base":
                continue
            if gate == "category_min":
                for category, minimum in threshold.items():
                    c = ((row.get("eval") or {}).get("categories") or {}).get(category)
                    results.append(_gate(f"category_min.{category}", c["passed"] if c else None, minimum, low=True))
                continue
            figure = None
            if gate == "ppl_ratio_max" and row.get("ppl") is not None and base.get("ppl"):
                figure = round(row["ppl"] / base["ppl"], 6)
            elif gate == "kld_mean_max":
                figure = row.get("kld_mean")
            elif gate == "same_top_min":
                figure = row.get("same_top_p_percent")
            elif gate == "score_min" and row.get("eval") and row["eval"].get("total"):
                figure = round(100 * row["eval"]["passed"] / row["eval"]["total"], 2)
            results.append(_gate(gate, figure, threshold, low=gate.endswith("_min")))
        row["gates"] = results
        row["shippable"] = all(r["passed"] is True for r in results)


def _gate(gate: str, figure: float | None, threshold: float, *, low: bool) -> dict[str, Any]:
    passed = None if figure is None else (figure >= threshold if low else figure <= threshold)
    return {"gate": gate, "figure": figure, "threshold": threshold, "passed": passed}


GATE_FIGURES = {"ppl_ratio_max": "PPL ratio", "kld_mean_max": "KLD", "same_top_min": "same top token %",
                "score_min": "tests passed %", "category_min": "tests passed"}


def gate_text(result: dict[str, Any]) -> str:
    """One gate's outcome in words: "kld_mean_max: KLD 0.0312 > 0.01", "score_min: not measured"."""
    gate = result["gate"]
    if result["passed"] is None:
        return f"{gate}: not measured"
    op = (">=" if result["passed"] else "<") if gate.split(".")[0].endswith("_min") else \
        ("<=" if result["passed"] else ">")
    what = GATE_FIGURES[gate.split(".")[0]] + (f" in {gate.split('.', 1)[1]}" if "." in gate else "")
    return f"{gate}: {what} {result['figure']:g} {op} {result['threshold']:g}"


def _gate_cell(row: dict[str, Any] | None) -> str:
    if not row or "gates" not in row:
        return "–"
    bad = [gate_text(r) for r in row["gates"] if r["passed"] is not True]
    return "pass" if not bad else "**fails** " + "; ".join(bad)


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
            tallies = {v: (r if category == "TOTAL" else r["categories"].get(category)) if r else None
                       for v, r in reports.items()}
            cells = [_score_cell(t, with_rate=category == "TOTAL") if t else "–" for t in tallies.values()]
            if delta:
                cells.append(_delta_cell(tallies[delta[0]], tallies[delta[1]]))
            lines.append(f"| {_type_label(qtype)} {category} | " + " | ".join(cells) + " |")
            lines += _other_count(qtype, category, reports, names, delta)
        for key, text in (("tokens_per_s", "tokens/s"), ("wall_s", "eval wall time (s)")):
            cells = [f"{r[key]:.1f}" if (r := reports[v]) and r.get(key) is not None else "–" for v in names]
            if delta:
                a, b = reports[delta[0]], reports[delta[1]]
                cells.append(f"{b[key] - a[key]:+.1f}" if a and b and None not in (a.get(key), b.get(key)) else "–")
            lines.append(f"| {_type_label(qtype)} {text} | " + " | ".join(cells) + " |")
    if board.get("gates"):
        for qtype in types:
            rows = {v: by.get((v, qtype)) for v in names}
            if any(r and r.get("gates") for r in rows.values()):
                lines.append(f"| {_type_label(qtype)} gates | " + " | ".join(_gate_cell(rows[v]) for v in names)
                             + (" | |" if delta else " |"))
    if board.get("cells"):
        lines += _cells_markdown(board)
    chart = f"\n![score and KLD against file size]({C.SCOREBOARD_PNG})\n" if board.get("chart") else ""
    return f"# {board['recipe']}: scoreboard\n\n" + "\n".join(lines) + "\n" + chart


def _score_cell(t: dict[str, Any], *, with_rate: bool = False) -> str:
    """Passes over verdicts, then what got none ("2/5, 1 truncated"), and on TOTAL rows the rate with its 95 %
    interval: "8/40 (20 %, 11-35), 4 not run"."""
    statuses = t.get("statuses") or {}
    cell = f"{statuses.get('pass', 0)}/{t['verdicts']}"
    if with_rate and t.get("rate") is not None:
        low, high = t["interval"]
        cell += f" ({100 * t['rate']:.0f} %, {100 * low:.0f}-{100 * high:.0f})"
    apart = [f"{n} {s}" for s, n in statuses.items() if s not in ("pass", "fail")]
    return ", ".join([cell, *apart])


def _delta_cell(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    """The difference of two pass rates in points, marked "within noise" when its 95 % interval holds 0."""
    from steps.evalsuite.scores import difference
    d = difference(a, b) if a and b else None
    if d is None:
        return "–"
    return f"{100 * d['delta']:+.0f} pts" + (" (within noise)" if d["within_noise"] else "")


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


STATUS_COLOURS = {"pass": "#2e7d32", "fail": "#c62828", "truncated": "#f9a825", "error": "#6a1b9a",
                  "not run": "#9e9e9e"}


def chart(board: dict[str, Any], dest: Path) -> bool:
    """``scoreboard.png``: the pass rate (with its 95 % interval) and the KL-divergence against GGUF file size, one
    point per GGUF, one colour and marker per variant (points of one size spread apart, so equal sizes stay
    readable); under them, each evaluated GGUF's draws per category by status (pass, fail, truncated, error, not
    run). False (nothing written) when there is nothing to plot."""
    rows = [r for r in board["models"] if r.get("size")]
    scored = [r for r in rows if r.get("eval") and r["eval"].get("rate") is not None]
    diverged = [r for r in rows if r.get("kld_mean") is not None]
    evaluated = [r for r in board["models"] if r.get("eval")]
    if not scored and not diverged and not evaluated:
        return False
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    panels = [p for p in ((scored, "pass rate (%, 95 % interval)"), (diverged, "KLD vs the unquantized GGUF")) if p[0]]
    categories = list(dict.fromkeys(c for r in evaluated for c in r["eval"]["categories"]))
    bars = len(evaluated) * len(categories)
    top = 4.2 if panels else 0.0
    height = top + (0.9 + 0.22 * bars if bars else 0.0)
    fig = plt.figure(figsize=(12, height), dpi=100)
    grid = fig.add_gridspec(2 if bars and panels else 1, max(1, len(panels)),
                            height_ratios=[top, height - top] if bars and panels else None)
    colours = {v: f"C{i}" for i, v in enumerate(board["variants"])}
    markers = {v: ("o", "s", "^", "D", "v")[i % 5] for i, v in enumerate(board["variants"])}
    gb = max((r["size"] for r in rows), default=0) >= 1e9
    unit, scale = ("GB", 1e9) if gb else ("MB", 1e6)
    spread = 0.012 * (max((r["size"] for r in rows), default=1) / scale)
    for i, (found, ylabel) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        for k, variant in enumerate(board["variants"]):
            mine = sorted((r for r in found if r["variant"] == variant), key=lambda r: r["size"])
            if not mine:
                continue
            x = [r["size"] / scale + (k - (len(board["variants"]) - 1) / 2) * spread for r in mine]
            if found is scored:
                y = [100 * r["eval"]["rate"] for r in mine]
                err = [[y_ - 100 * r["eval"]["interval"][0] for y_, r in zip(y, mine, strict=True)],
                       [100 * r["eval"]["interval"][1] - y_ for y_, r in zip(y, mine, strict=True)]]
                ax.errorbar(x, y, yerr=err, marker=markers[variant], color=colours[variant], capsize=3,
                            label=_label(board["recipe"], variant))
            else:
                ax.plot(x, [r["kld_mean"] for r in mine], marker=markers[variant], color=colours[variant],
                        label=_label(board["recipe"], variant))
        sizes = sorted({r["size"] for r in found})
        ax.set_xticks([size / scale for size in sizes],
                      ["/".join(sorted({_type_label(r["type"]) for r in found if r["size"] == size}))
                       + f" {size / scale:.1f}" for size in sizes], fontsize=7, rotation=35, ha="right")
        ax.set_xlabel(f"GGUF size ({unit})")
        ax.set_ylabel(ylabel)
        if found is scored:
            ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if bars:
        ax = fig.add_subplot(grid[1, :] if panels else grid[0, 0])
        labels, y = [], 0
        for category in categories:
            for r in evaluated:
                counts = (r["eval"]["categories"].get(category) or {}).get("statuses") or {}
                left = 0
                for status, colour in STATUS_COLOURS.items():
                    n = counts.get(status, 0)
                    if n:
                        ax.barh(y, n, left=left, color=colour, edgecolor="white", height=0.8,
                                label=status if status not in ax.get_legend_handles_labels()[1] else None)
                        left += n
                labels.append(f"{category}: {_label(board['recipe'], r['variant'])} {_type_label(r['type'])}")
                y += 1
            ax.axhline(y - 0.5, color="black", linewidth=0.5)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("draws (tests x samples) by status")
        ax.legend(fontsize=8, ncol=len(STATUS_COLOURS), loc="lower center", bbox_to_anchor=(0.5, 1.0),
                  frameon=False)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"{board['recipe']}: scores, KLD and statuses")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))
    fig.savefig(dest, metadata={"Software": None})
    plt.close(fig)
    return True


def _label(recipe: str, variant: str) -> str:
    if variant == recipe:
        return "raw merge"
    rest = variant.removeprefix(recipe).lstrip("@")
    return f"source {rest.removeprefix(C.SOURCE_INFIX)}" if rest.startswith(C.SOURCE_INFIX) else rest.lstrip("-")


def _type_label(qtype: str) -> str:
    return "unquantized" if qtype == "base" else qtype


STAGE = Declaration(build=build)


if __name__ == "__main__":
    from steps.plan import find
    from steps.store import execute
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    execute(find(f"scoreboard:{sys.argv[1]}"))
