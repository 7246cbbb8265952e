"""heal: a (Q)LoRA fine-tune of the merged model that repairs a layer-stacked merge's seam, as a cached stage.

The command line (the stage itself is documented in steps/heal/__init__.py)::

    python -m steps.heal recipes/demo.yaml --dry-run    # load everything, count, estimate memory; train nothing
    python -m steps.heal demo                           # run the heal stage of a recipe
    python -m steps.heal train <job.json>               # what a launcher runs in each process (build writes the job)
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.errors import MergeforgeError
from steps.heal.model import add_lora, check_model, count_parameters, device_name, load_model
from steps.heal.paths import merged_dir
from steps.heal.tokens import load_tokens
from steps.heal.training import train

if TYPE_CHECKING:
    from steps.hashing import StatCache
    from steps.stage import Stage


def dry_run(stage: Stage, cache: StatCache, out: Any = None) -> dict[str, Any]:
    """Load the tokenizer, the data, and the model with its quantization and LoRA; print trainable parameters,
    token counts and a memory estimate; train nothing. Returns the figures."""
    out = out or sys.stdout
    started = time.perf_counter()
    model_dir = merged_dir(stage)
    if not (model_dir / "config.json").is_file():
        raise MergeforgeError(f"{stage.id}: no merged model at {model_dir}; run `doit merge:{stage.recipe.name}` "
                              "first")
    params, t = stage.params, stage.params["train"]
    targets = check_model(stage)
    tokens = load_tokens(stage, cache)
    device = device_name()
    model = add_lora(params, load_model(params, model_dir, device), targets)
    trainable, total = count_parameters(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    cfg = model.config
    text = getattr(cfg, "text_config", None) or cfg
    hidden, layers = int(getattr(text, "hidden_size", 0)), int(getattr(text, "num_hidden_layers", 0))
    vocab = int(getattr(text, "vocab_size", 0))
    inter = int(getattr(text, "intermediate_size", 0) or 4 * hidden)
    longest = int(max(tokens.starts[1:] - tokens.starts[:-1]))
    seq = t["batch_size"] * min(longest, t["max_length"])
    act_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[params["compute_dtype"]]
    if t["gradient_checkpointing"]:      # each block's input kept, one block's activations recomputed at a time
        activations = seq * hidden * layers * act_bytes + seq * (12 * hidden + 3 * inter) * act_bytes
    else:                                # about 12 hidden-sized and 3 intermediate-sized tensors per block
        activations = seq * (12 * hidden + 3 * inter) * act_bytes * layers
    logits = seq * vocab * (act_bytes + 4 + 4)            # logits, their float32 copy and its gradient
    optimizer = trainable * (4 + 4 + 8)                  # gradients, and Adam's two moments (the weights are above)
    estimate = weights + optimizer + activations + logits
    per_step = t["batch_size"] * t["grad_accum"]
    figures = {"model": type(model.get_base_model()).__name__, "device": device,
               "quantization": params["quantization"], "trainable_params": trainable, "params": total,
               "lora_modules": len(targets.modules), "target_modules": list(targets.names),
               "layers": [targets.layers[0], targets.layers[-1] + 1], "rows": tokens.info["rows"],
               "examples": len(tokens), "tokens": tokens.info["tokens_count"],
               "label_tokens": tokens.info["label_tokens"], "sources": tokens.info["sources"],
               "examples_per_step": per_step, "epochs": round(t["max_steps"] * per_step / max(1, len(tokens)), 2),
               "memory": {"weights": weights, "optimizer_and_grads": optimizer, "activations": activations,
                          "logits": logits, "total": estimate},
               "seconds": round(time.perf_counter() - started, 2)}
    print(f"{stage.id}: {figures['model']} on {device}, {params['quantization']}"
          + (" + double quantization" if params["double_quant"] else "") + f", compute {params['compute_dtype']}",
          file=out)
    print(f"  LoRA r {params['lora']['r']} alpha {params['lora']['alpha']:g} on {len(targets.modules)} modules "
          f"({', '.join(targets.names)}) in blocks {targets.layers[0]}..{targets.layers[-1]}", file=out)
    print(f"  trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f} %)", file=out)
    for s in tokens.info["sources"]:
        rej = ", ".join(f"{n} {r}" for r, n in s["rejected"].items())
        print(f"  data {s['source']}: {s['read']} read, {s['usable']} usable, {s['selected']} in the blend "
              f"(weight {s['weight']:g}){'; rejected: ' + rej if rej else ''}", file=out)
    print(f"  blend: {tokens.info['rows']} rows -> {len(tokens)} examples "
          f"({'packed' if t['pack'] else 'padded'}, max_length {t['max_length']}), {tokens.info['tokens_count']:,} "
          f"tokens, {tokens.info['label_tokens']:,} with loss; {t['max_steps']} steps x {per_step} examples = "
          f"{figures['epochs']} epochs", file=out)
    mem = figures["memory"]
    print(f"  memory estimate ({'GPU' if device != 'cpu' else 'RAM'}): weights {_size(mem['weights'])}, grads and "
          f"optimizer {_size(mem['optimizer_and_grads'])}, activations {_size(mem['activations'])}, logits "
          f"{_size(mem['logits'])}: about {_size(mem['total'])} (rough: the allocator's overhead and kernels' "
          "workspaces come on top)", file=out)
    print(f"  nothing trained ({figures['seconds']} s)", file=out)
    return figures


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _find_stage(arg: str) -> Stage:
    from steps.plan import find, plan
    from steps.recipe import load
    path = Path(arg)
    if path.is_file():
        stages = [s for s in plan(load(path)) if s.kind == "heal"]
        if not stages:
            raise MergeforgeError(f"{path}: the recipe has no heal: block")
        return stages[0]
    try:
        return find(arg if arg.startswith("heal:") else f"heal:{arg}")
    except KeyError:
        raise MergeforgeError(f"no recipe named {arg!r} with a heal: block (give a recipe file or a recipe "
                              "name)") from None


def main(argv: list[str]) -> int:
    import argparse

    from steps.errors import user_message
    parser = argparse.ArgumentParser(prog="python -m steps.heal", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="a recipe file or name; or `train <job.json>` (what a launcher runs)")
    parser.add_argument("job", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help="load and count everything, train nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.recipe == "train" and args.job:
            train(json.loads(Path(args.job).read_text()))
            return 0
        stage = _find_stage(args.recipe)
        if args.dry_run:
            from steps.store import stat_cache
            cache = stat_cache()
            dry_run(stage, cache)
            cache.save()
        else:
            from steps.store import execute
            execute(stage)
    except MergeforgeError as exc:
        print(user_message(exc), file=sys.stderr)
        return 1
    return 0
