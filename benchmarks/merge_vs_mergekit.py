"""Benchmark: this merge engine against mergekit on the same generated models, whole-process wall time and peak RSS.

    .venv/bin/python benchmarks/merge_vs_mergekit.py [--gib 1.0] [--methods passthrough,ties]

Generates Llama-shaped bf16 models of about --gib GiB each (three for ties: a base and two others), then for each
method runs `doit merge` (this project; the fetch stage, which fingerprints the inputs once, runs before the clock
starts) and `mergekit-yaml` on the same configuration, and, for passthrough, `cp` of the same bytes. mergekit
0.1.5 comes from the project environment when its test extra is installed, else it is installed from the package
registry into its own virtual environment under $MERGEFORGE_HOME (once).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from pipeline import PEAK_RSS, doit, make_big_model, workspace_env  # noqa: E402

MERGEKIT_VERSION = "0.1.5"


def mergekit_yaml() -> str:
    local = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent))
    if local:
        return local
    from steps.toolchain import home
    venv = home() / f"mergekit-{MERGEKIT_VERSION}-venv"
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0",
                        f"mergekit=={MERGEKIT_VERSION}"], check=True)
    return str(exe)


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a command and its children."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *argv], env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    kib = int(re.search(r"PEAK_RSS_KIB=(\d+)", proc.stdout).group(1))  # type: ignore[union-attr]
    return seconds, kib / 1024


def configs(models: dict[str, Path], layers: int) -> dict[str, dict[str, object]]:
    return {
        "passthrough": {"merge_method": "passthrough", "dtype": "bfloat16",
                        "slices": [{"sources": [{"model": "a", "layer_range": [0, layers]}]}]},
        "ties": {"merge_method": "ties", "dtype": "bfloat16", "base_model": "base",
                 "models": [{"model": "a", "parameters": {"weight": 0.5, "density": 0.5}},
                            {"model": "b", "parameters": {"weight": 0.5, "density": 0.5}}]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--methods", default="passthrough,ties")
    args = parser.parse_args()
    methods = args.methods.split(",")
    mergekit = mergekit_yaml()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mergeforge-mk.") as tmp:
        ws = Path(tmp)
        names = ["a"] + (["base", "b"] if "ties" in methods else [])
        models = {}
        for seed, name in enumerate(names):
            models[name] = ws / f"model-{name}"
            layers = make_big_model(models[name], args.gib, seed=seed)
        size = sum(p.stat().st_size for p in models["a"].glob("*.safetensors"))
        env = workspace_env(ws)
        (ws / "recipes").mkdir()
        for method in methods:
            merge = configs(models, layers)[method]
            (ws / "recipes" / f"{method}.yaml").write_text(yaml.safe_dump(
                {"sources": {n: {"path": str(p)} for n, p in models.items() if method == "ties" or n == "a"},
                 "merge": merge}))
        subprocess.run(doit("fetch"), env=env, cwd=ws, check=True, capture_output=True)
        for method in methods:
            merge = configs(models, layers)[method]
            ours_s, ours_mib = timed(doit(f"merge:{method}"), env, ws)
            mk_config = ws / f"mergekit-{method}.yml"
            mk_config.write_text(yaml.safe_dump(json.loads(json.dumps(merge).replace(
                '"model": "a"', f'"model": "{models["a"]}"').replace('"model": "b"', f'"model": "{models.get("b")}"')
                .replace('"base_model": "base"', f'"base_model": "{models.get("base")}"'))))
            mk_s, mk_mib = timed([mergekit, str(mk_config), str(ws / f"mk-{method}"), "--no-copy-tokenizer",
                                  "--allow-crimes", "-j", str(os.cpu_count() or 1), "--quiet"], env, ws)
            row = {"ours_s": round(ours_s, 2), "ours_peak_rss_mib": round(ours_mib), "mergekit_s": round(mk_s, 2),
                   "mergekit_peak_rss_mib": round(mk_mib), "time_ratio": round(ours_s / mk_s, 3),
                   "rss_ratio": round(ours_mib / mk_mib, 3)}
            if method == "passthrough":
                cp_s, _ = timed(["cp", str(models["a"] / "model.safetensors"), str(ws / "copy.safetensors")], env, ws)
                (ws / "copy.safetensors").unlink()
                stage = json.loads((ws / "build" / method / ".mf" / "events.jsonl").read_text().splitlines()[-1])
                row.update({"cp_s": round(cp_s, 2), "merge_stage_s": stage["seconds"],
                            "stage_speed_vs_cp": round(cp_s / stage["seconds"], 3)})
            results[method] = row
            print(json.dumps({method: row}), flush=True)
            shutil.rmtree(ws / f"mk-{method}")
    print(json.dumps({"input_bytes_per_model": size, "layers": layers, "results": results}, indent=1))


if __name__ == "__main__":
    main()
