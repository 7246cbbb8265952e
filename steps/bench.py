"""bench: the scoreboard. For the unquantized GGUF and each quant: file size, llama-perplexity PPL on held-out
text, and the KL-divergence of each quant's token distributions against the unquantized model's logits.

    python -m steps.bench demo                   # run the bench stage of recipes/demo.yaml
"""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps import constants as C
from steps import toolchain
from steps.plan import threads

if TYPE_CHECKING:
    from steps.store import Context

logger = logging.getLogger(__name__)

_NUM = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
PATTERNS = {
    "ppl":            rf"Final estimate: PPL = {_NUM} \+/- {_NUM}",
    "ppl_q":          rf"Mean PPL\(Q\)\s*:\s*{_NUM}\s*±\s*{_NUM}",
    "kld_mean":       rf"Mean\s+KLD:\s*{_NUM}\s*±\s*{_NUM}",
    "kld_median":     rf"Median\s+KLD:\s*{_NUM}",
    "kld_max":        rf"Maximum KLD:\s*{_NUM}",
    "same_top_p":     rf"Same top p:\s*{_NUM}\s*±\s*{_NUM}",
}


def parse(output: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for key, pattern in PATTERNS.items():
        m = re.search(pattern, output)
        if m:
            found[key] = float(m.group(1))
            if m.lastindex and m.lastindex > 1:
                found[key + "_err"] = float(m.group(2))
    return found


def perplexity(model: Path, text: Path, params: dict[str, Any], extra: list[str]) -> dict[str, float]:
    chain = toolchain.locate()
    proc = toolchain.run([chain.program("llama-perplexity"), "-m", str(model), "-f", str(text),
                          "-c", str(params["context"]), "--chunks", str(params["chunks"]), "-t", str(threads()),
                          *toolchain.gpu_args(), *extra], what=f"perplexity {model.name}")
    values = parse(proc.stdout + proc.stderr)
    if "ppl" not in values and "ppl_q" not in values:
        raise ValueError(f"llama-perplexity printed no PPL for {model.name}; is the held-out text long enough for "
                         f"{params['chunks']} chunks of {params['context']} tokens?")
    return values


def build(ctx: Context) -> None:
    stage = ctx.stage
    heldout = stage.files["heldout"]
    base_name = ctx.upstream_file("convert")
    base_path = stage.build_dir / base_name
    logits = ctx.out.parent / "base-logits.kld"
    base = perplexity(base_path, heldout, stage.params, ["--kl-divergence-base", str(logits)])
    rows = [_row(base_name, base_path, ctx, {"ppl": base["ppl"], "ppl_err": base.get("ppl_err")})]
    for dep in stage.deps:
        if not dep.startswith("quantize:"):
            continue
        (name,) = ctx.inputs[dep]["outputs"]
        path = stage.build_dir / name
        q = perplexity(path, heldout, stage.params, ["--kl-divergence-base", str(logits), "--kl-divergence"])
        rows.append(_row(name, path, ctx, {
            "type": dep.rsplit("-", 1)[-1], "ppl": q.get("ppl_q", q.get("ppl")), "ppl_err": q.get("ppl_q_err"),
            "kld_mean": q.get("kld_mean"), "kld_mean_err": q.get("kld_mean_err"),
            "kld_median": q.get("kld_median"), "kld_max": q.get("kld_max"),
            "same_top_p_percent": q.get("same_top_p")}))
    logits.unlink(missing_ok=True)
    board = {"schema": C.SCHEMA_VERSION, "recipe": stage.recipe.name,
             "settings": {"heldout_digest": ctx.cache.digest(heldout), **stage.params},
             "llama_cpp": stage.tools().get("llama.cpp"), "models": rows}
    (ctx.out / C.SCOREBOARD).write_text(json.dumps(board, indent=1) + "\n")


def _row(name: str, path: Path, ctx: Context, values: dict[str, Any]) -> dict[str, Any]:
    digest = next(info["digest"] for dep in ctx.inputs.values() for rel, info in dep["outputs"].items() if rel == name)
    row = {"file": name, "size": path.stat().st_size, "digest": digest, "type": values.pop("type", "base")}
    row.update({k: v for k, v in values.items() if v is not None})
    return row


if __name__ == "__main__":
    from steps.plan import find
    from steps.store import execute
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    execute(find(f"bench:{sys.argv[1]}"))
