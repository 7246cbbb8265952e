"""Benchmark: the capability suite on the demo's GGUFs, each eval a whole process: suite wall time per GGUF, and the
speed-up from running tests concurrently on llama-server's parallel slots against one at a time (same run).

    .venv/bin/python benchmarks/eval.py                      # BF16, Q4_K_M, Q8_0 with 2 slots; Q4_K_M with 1 slot
    .venv/bin/python benchmarks/eval.py --ggufs Q4_K_M       # one GGUF
    .venv/bin/python benchmarks/eval.py --store cache        # reuse a store (the demo's GGUFs restore from it)
    .venv/bin/python benchmarks/eval.py --max-tokens 512     # a larger token cap than the demo's 96

In a temporary workspace: `doit quantize` of the raw demo merge (restored from --store when it holds it), then
`python -m steps.eval demo-<GGUF>` for each GGUF with the demo's eval settings and ``server.parallel`` 2 (the
demo's), and once more for the first GGUF with ``server.parallel`` 1, each under a peak-RSS wrapper (the largest
single process: the runner or its llama-server). The evals use
a store of their own, so nothing is restored. Prints one JSON object per run and a summary with the speed-up
(wall time with 1 slot / wall time with N slots; the timed performance tests run alone in both).

On a CUDA machine, --model runs the suite on any GGUF instead (e.g. a 0.5-1B instruct model) with GPU offload:
    .venv/bin/python benchmarks/eval.py --model qwen2.5-0.5b-instruct-q4_k_m.gguf --max-tokens 512 --parallel 4
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEAK_RSS = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]);"
            "print('PEAK_RSS_KIB=%d' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def recipe_text(parallel: int, max_tokens: int | None, ggufs: list[str]) -> str:
    text = (ROOT / "recipes" / "demo.yaml").read_text().replace("data/", f"{ROOT / 'recipes' / 'data'}/")
    text = re.sub(r"server: \{context: (\d+), parallel: \d+\}", rf"server: {{context: \1, parallel: {parallel}}}",
                  text)
    text = re.sub(r"  ggufs: \[[^\]]*\]", f"  ggufs: [{', '.join(ggufs)}]", text)
    if max_tokens is not None:
        text = re.sub(r"max_tokens: \d+ ", f"max_tokens: {max_tokens} ", text)
    return text


def run_eval(ws: Path, env: dict[str, str], name: str) -> dict[str, object]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "steps.eval", name], env=env,
                          cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    peak = int(re.search(r"PEAK_RSS_KIB=(\d+)", proc.stdout).group(1))  # type: ignore[union-attr]
    report = json.loads((ws / "build" / "demo" / f"{name}.eval.json").read_text())
    return {"gguf": report["gguf"], "parallel": report["settings"]["server"].get("parallel", 1),
            "process_seconds": round(seconds, 1), "suite_wall_s": report["wall_s"], "passed": report["passed"],
            "total": report["total"], "tokens_per_s": report["tokens_per_s"],
            "completion_tokens": report["completion_tokens"], "peak_rss_mib": round(peak / 1024)}


def model_run(args: argparse.Namespace) -> None:
    """The suite on a GGUF given by path (GPU offload when the toolchain has CUDA)."""
    from steps import server
    from steps.eval import run_suite
    from steps.evalsuite import all_tests
    from steps.recipe.eval import EVAL
    from steps.recipe.fields import defaults
    params = {**defaults(EVAL), "max_tokens": args.max_tokens or 512, "server": {"parallel": args.parallel,
                                                                          "context": 8192}}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        with server.serve(Path(args.model), params["server"], Path(tmp) / "server.log", timeout_s=600) as url:
            results = run_suite(url, params, all_tests())
        wall = time.monotonic() - started
    tokens = sum(r["completion_tokens"] for r in results)
    seconds = sum(r["generation_s"] for r in results)
    print(json.dumps({"model": args.model, "parallel": args.parallel, "wall_s": round(wall, 1),
                      "passed": sum(r["passed"] for r in results), "total": len(results),
                      "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ggufs", nargs="+", default=["BF16", "Q4_K_M", "Q8_0"])
    parser.add_argument("--store", type=Path, default=None, help="a store to reuse for the demo's GGUFs")
    parser.add_argument("--max-tokens", type=int, default=None, help="eval.max_tokens instead of the demo's")
    parser.add_argument("--parallel", type=int, default=2, help="llama-server slots of the concurrent runs")
    parser.add_argument("--model", default=None, help="evaluate this GGUF instead of the demo's")
    args = parser.parse_args()
    if args.model:
        model_run(args)
        return
    runs = []
    with tempfile.TemporaryDirectory(prefix="mergeforge-eval-bench.") as tmp:
        ws = Path(tmp)
        (ws / "recipes").mkdir()
        recipe = ws / "recipes" / "demo.yaml"
        recipe.write_text(recipe_text(args.parallel, args.max_tokens, args.ggufs))
        env = dict(os.environ, MERGEFORGE_RECIPES=str(ws / "recipes"), MERGEFORGE_BUILD=str(ws / "build"),
                   MERGEFORGE_STORE=str((args.store or ws / "cache").resolve()))
        targets = [f"quantize:demo-{g}" for g in args.ggufs if g != "BF16"] or ["convert:demo"]
        subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *targets], env=env, cwd=ws,
                       check=True, capture_output=True)
        env["MERGEFORGE_STORE"] = str(ws / "eval-store")     # nothing restored: every eval runs
        for gguf in args.ggufs:
            runs.append(run_eval(ws, env, f"demo-{gguf}"))
            print(json.dumps(runs[-1]), flush=True)
        recipe.write_text(recipe_text(1, args.max_tokens, args.ggufs))
        runs.append(run_eval(ws, env, f"demo-{args.ggufs[0]}"))
        print(json.dumps(runs[-1]), flush=True)
    concurrent, alone = runs[0], runs[-1]
    print(json.dumps({"summary": {
        "suite_wall_s_per_gguf": {r["gguf"]: r["suite_wall_s"] for r in runs[:-1]},
        "speedup_parallel_vs_one_at_a_time": round(float(alone["suite_wall_s"]) / float(concurrent["suite_wall_s"]),
                                                   2),
        "slots": args.parallel, "cpus": os.cpu_count()}}))


if __name__ == "__main__":
    main()
