"""Benchmark: the demo's heal stage on this machine, as a whole process: wall time, tokens/s, peak RSS.

    .venv/bin/python benchmarks/heal.py              # about 3 minutes on 2 CPU cores (plus the demo's fetch once)
    .venv/bin/python benchmarks/heal.py --steps 8    # a shorter run

In a temporary workspace: fetch + merge of recipes/demo.yaml (restored from MERGEFORGE_STORE when it holds them),
then `python -m steps.heal demo` under a peak-RSS wrapper with the demo's heal settings (max_steps overridden when
--steps is given). Prints a JSON summary: seconds, steps, trained tokens, tokens/s (overall and the median of the
logged steps), peak RSS of the heal process, first and last loss. On a CUDA machine the same script measures the
GPU heal; peak GPU memory is printed by torch when available.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEAK_RSS = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True);"
            "print('PEAK_RSS_KIB=%d' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=None, help="max_steps instead of the demo's")
    parser.add_argument("--store", type=Path, default=None, help="a store to reuse (fetch and merge restore)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mergeforge-heal-bench.") as tmp:
        ws = Path(tmp)
        (ws / "recipes").mkdir()
        text = (ROOT / "recipes" / "demo.yaml").read_text().replace("data/", f"{ROOT / 'recipes' / 'data'}/")
        if args.steps is not None:
            text = re.sub(r"max_steps: \d+", f"max_steps: {args.steps}", text)
        (ws / "recipes" / "demo.yaml").write_text(text)
        env = dict(os.environ, MERGEFORGE_RECIPES=str(ws / "recipes"), MERGEFORGE_BUILD=str(ws / "build"),
                   MERGEFORGE_STORE=str(args.store or ws / "cache"))
        subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "merge"], env=env, cwd=ws,
                       check=True, capture_output=True)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "steps.heal", "demo"], env=env,
                              cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
        peak_kib = int(re.search(r"PEAK_RSS_KIB=(\d+)", proc.stdout).group(1))  # type: ignore[union-attr]
        out = ws / "build" / "demo"
        losses = json.loads((out / "loss.json").read_text())
        record = json.loads((out / ".mf" / "heal.demo.json").read_text())["heal"]
    tokens = int(record.get("tokens_trained") or 0)
    print(json.dumps({
        "seconds": round(seconds, 1), "train_seconds": record.get("seconds"), "steps": record.get("steps"),
        "tokens_trained": tokens,
        "tokens_per_s": round(tokens / record["seconds"], 1) if tokens and record.get("seconds") else None,
        "tokens_per_s_median_logged": statistics.median(e["tokens_per_second"] for e in losses),
        "peak_rss_mib": round(peak_kib / 1024), "loss_first": losses[0]["loss"], "loss_last": losses[-1]["loss"],
        "device": record.get("device"),
    }, indent=1))


if __name__ == "__main__":
    main()
