"""The heal's outputs: the adapter as peft writes it, the loss curve (loss.json, loss.png), and the healed model
(the adapter merged into the unquantized merged weights)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps import constants as C
from steps.errors import StepFailed
from steps.heal.paths import merged_dir

if TYPE_CHECKING:
    from steps.stage import Context


def write_outputs(ctx: Context, final: Path, result: dict[str, Any]) -> None:
    """adapter/, loss.json, loss.png and healed/ into the stage's output directory (in a sweep's cell: adapter@<cell>/,
    loss@<cell>.json, ...)."""
    cell = f"@{ctx.stage.cell}" if ctx.stage.cell else ""
    adapter = ctx.out / f"adapter{cell}"
    adapter.mkdir()
    shutil.copyfile(final / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    config = json.loads((final / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = merged_dir(ctx.stage).name   # build/<recipe>/merged, not this machine's path
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (ctx.out / f"loss{cell}.json").write_text(json.dumps(result["losses"], indent=1) + "\n")
    plot_loss(result["losses"], ctx.out / f"loss{cell}.png", ctx.stage.id)
    shard_bytes = int(ctx.stage.recipe.merge.get("shard_bytes", C.DEFAULT_SHARD_BYTES))
    write_healed(merged_dir(ctx.stage), adapter, ctx.out / ctx.stage.outputs[0].split("/", 1)[0], shard_bytes)


def plot_loss(losses: list[dict[str, Any]], dest: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([e["step"] for e in losses], [e["loss"] for e in losses], marker="." if len(losses) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest, metadata={"Software": None})
    plt.close(fig)


def write_healed(model_dir: Path, adapter_dir: Path, dest: Path, shard_bytes: int) -> list[str]:
    """The adapter merged into the unquantized merged weights, streamed tensor by tensor: each LoRA'd weight
    becomes W + scaling * B @ A (float32, rounded once to W's dtype), what peft's merge_and_unload computes;
    every other tensor is copied as bytes. Sharded as the merge was; non-weight files copied."""
    import torch
    from safetensors.torch import load_file

    from steps.tensors import INDEX_NAME, ModelReader, OutTensor, write_model
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_rslora") or config.get("use_dora"):
        raise StepFailed(f"{adapter_dir}: rsLoRA/DoRA adapters are not merged here")
    scaling = float(config["lora_alpha"]) / float(config["r"])
    state = load_file(adapter_dir / "adapter_model.safetensors")
    pairs: dict[str, dict[str, Any]] = {}
    for name, tensor in state.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", name)
        if not m:
            raise StepFailed(f"{adapter_dir}: unexpected adapter tensor {name}")
        pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
    reader = ModelReader(model_dir)
    try:
        missing = sorted(f"{mod}.weight" for mod in pairs if f"{mod}.weight" not in reader.tensors)
        if missing:
            raise StepFailed(f"{model_dir}: the adapter's module {missing[0]} has no tensor of that name in the "
                             "merged model (its checkpoint names differ from transformers' module names)")
        deltas = {f"{mod}.weight": ab for mod, ab in pairs.items()}

        def merged(name: str) -> Any:
            def produce() -> Any:
                w = reader.tensor(name)
                ab = deltas[name]
                out = (w.float() + (ab["B"].float() @ ab["A"].float()) * scaling).to(w.dtype)
                return out.contiguous().view(torch.uint8).reshape(-1).numpy()
            return produce

        def raw(name: str) -> Any:
            return lambda: reader.raw(name)

        tensors = [OutTensor(i.name, i.dtype, i.shape, merged(i.name) if i.name in deltas else raw(i.name))
                   for i in sorted(reader.tensors.values(), key=lambda i: (str(i.file), i.start))]
        dest.mkdir(parents=True)
        shards = write_model(dest, tensors, shard_bytes)
    finally:
        reader.close()
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != INDEX_NAME:
            shutil.copyfile(path, dest / path.name)
    return shards
