"""Benchmark: no-op doit, restore from the store, and a 2 GiB merge, each as whole-process wall time.

    .venv/bin/python benchmarks/pipeline.py             # demo part + 2 GiB part (about 8 minutes on 2 cores)
    .venv/bin/python benchmarks/pipeline.py --skip-demo # only the 2 GiB part

Demo part (in a temporary workspace): a full build of recipes/demo.yaml; `doit` start-up on a one-task dodo
(doit's own cost) against a no-op `doit` on the demo; then build/ removed and doit's state forgotten, so every
stage is restored from the store: restore time against build time, per stage.

2 GiB part: a generated Llama-shaped bf16 model of about 2 GiB as a local source; fetch + passthrough merge
(copy of every layer) timed against `cp` of the same bytes, with the merge's peak RSS; no-op `doit merge` before
and after touching the source and every artifact; and, for reference, doit's own md5 file_dep checker on the same
touched 2 GiB file.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic model generator the tests use

TRIVIAL_DODO = '''
def task_noop():
    return {"actions": [], "uptodate": [True]}
'''
PEAK_RSS = (  # run a command, then print the peak RSS (KiB) of it and its children
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True);"
    "print('PEAK_RSS_KIB=%d' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
MD5_DODO = '''
import os
import re
def task_md5():
    return {"actions": ["true"], "file_dep": [os.environ["BIG_FILE"]]}
'''


def run(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def median_of(n: int, argv: list[str], env: dict[str, str], cwd: Path) -> float:
    return statistics.median(run(argv, env, cwd)[0] for _ in range(n))


def workspace_env(ws: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(MERGEFORGE_RECIPES=str(ws / "recipes"), MERGEFORGE_BUILD=str(ws / "build"),
               MERGEFORGE_STORE=str(ws / "cache"))
    return env


def doit(*args: str) -> list[str]:
    return [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args]


def events(ws: Path, recipe: str) -> list[dict[str, object]]:
    path = ws / "build" / recipe / ".mf" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def demo_part(ws: Path) -> dict[str, object]:
    env = workspace_env(ws)
    (ws / "recipes").symlink_to(ROOT / "recipes")
    full, _ = run(doit(), env, ws)
    built = {e["stage"]: e["seconds"] for e in events(ws, "demo") if e["action"] == "built"}
    (ws / "trivial.py").write_text(TRIVIAL_DODO)
    startup = median_of(5, [sys.executable, "-m", "doit", "-f", str(ws / "trivial.py")], env, ws)
    noop = median_of(5, doit(), env, ws)
    shutil.rmtree(ws / "build" / "demo")
    run(doit("forget", "--all"), env, ws)
    restore_all, out = run(doit(), env, ws)
    restored = {e["stage"]: e["seconds"] for e in events(ws, "demo") if e["action"] == "restored"}
    assert set(restored) == set(built), "every stage restores from the store"
    stages = {s: {"build_s": built[s], "restore_s": restored[s], "ratio": round(restored[s] / built[s], 4)}
              for s in built}
    return {"full_build_s": round(full, 1), "doit_startup_s": round(startup, 3), "noop_doit_s": round(noop, 3),
            "noop_beyond_startup_s": round(noop - startup, 3), "restore_everything_s": round(restore_all, 2),
            "stages": stages}


def make_big_model(dest: Path, gib: float, seed: int = 0) -> int:
    """A Llama-shaped bf16 model of about `gib` GiB (hidden 2048, like a 1B model); returns its layer count."""
    from conftest import make_synthetic_llama
    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 2 * hidden * hidden + 2 * hidden * (hidden // 4) + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((gib * 2**30 / 2 - 2 * vocab * hidden) / per_layer))
    make_synthetic_llama(dest, layers, hidden, inter, vocab, seed)
    return layers


def big_part(ws: Path, gib: float) -> dict[str, object]:
    env = workspace_env(ws)
    model = ws / "big-model"
    layers = make_big_model(model, gib)
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    (ws / "recipes").mkdir()
    (ws / "recipes" / "big.yaml").write_text(
        f"sources:\n  a: {{path: {model}}}\nmerge:\n  merge_method: passthrough\n  dtype: bfloat16\n"
        f"  slices:\n    - sources: [{{model: a, layer_range: [0, {layers}]}}]\n")
    os.sync()
    copy_s, _ = run(["cp", str(model / "model.safetensors"), str(ws / "copy.safetensors")], env, ws)
    (ws / "copy.safetensors").unlink()
    fetch_s, _ = run(doit("fetch"), env, ws)            # hashes the 2 GiB source once (blake3)
    merge_s, out = run([sys.executable, "-c", PEAK_RSS, *doit("merge")], env, ws)
    peak_kib = int(re.search(r"PEAK_RSS_KIB=(\d+)", out).group(1))  # type: ignore[union-attr]
    merge_stage = next(e["seconds"] for e in events(ws, "big") if e["stage"] == "merge:big")
    noop = median_of(3, doit("merge"), env, ws)
    for root in (model, ws / "build" / "big"):
        for path in root.rglob("*"):
            if path.is_file():
                os.utime(path)
    touched, out = run(doit("merge"), env, ws)
    assert not any(line.startswith(".  ") for line in out.splitlines()), "touching must execute nothing"
    noop_after = median_of(3, doit("merge"), env, ws)
    (ws / "md5.py").write_text(MD5_DODO)
    md5_env = {**env, "BIG_FILE": str(model / "model.safetensors")}
    run([sys.executable, "-m", "doit", "-f", str(ws / "md5.py"), "--db-file", str(ws / "md5.db")], md5_env, ws)
    os.utime(model / "model.safetensors")
    md5_touched, _ = run([sys.executable, "-m", "doit", "-f", str(ws / "md5.py"), "--db-file", str(ws / "md5.db")],
                         md5_env, ws)
    return {"model_bytes": size, "layers": layers, "cp_s": round(copy_s, 2),
            "merge_stage_s": merge_stage, "merge_process_s": round(merge_s, 2),
            "passthrough_vs_copy_speed": round(copy_s / merge_stage, 3),
            "merge_peak_rss_mib": round(peak_kib / 1024, 1),
            "first_fetch_s (one blake3 of the source)": round(fetch_s, 2),
            "noop_doit_merge_s": round(noop, 3), "doit_after_touching_everything_s": round(touched, 3),
            "noop_after_touch_s": round(noop_after, 3), "doit_md5_file_dep_after_touch_s": round(md5_touched, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--gib", type=float, default=2.0)
    args = parser.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="mergeforge-bench.") as tmp:
        if not args.skip_demo:
            (Path(tmp) / "demo").mkdir()
            results["demo"] = demo_part(Path(tmp) / "demo")
            print(json.dumps({"demo": results["demo"]}, indent=1), flush=True)
        (Path(tmp) / "big").mkdir()
        results["big"] = big_part(Path(tmp) / "big", args.gib)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
