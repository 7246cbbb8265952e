"""convert: the merged model as a GGUF, with llama.cpp's own convert_hf_to_gguf.py, plus provenance metadata.

The converter runs in the project's environment with llama.cpp's vendored gguf-py. Afterwards the file is
rewritten once with the ``gguf`` package to add the recipe name, the stage key and the source revisions as
metadata (llama-quantize copies them into every quant); tensor bytes are streamed from a memory map.

A multi-token-prediction head (Qwen3.5's ``mtp.*``) is converted when complete and left out otherwise
(``gguf.mtp``); a vision tower becomes ``<recipe>-mmproj-<TYPE>.gguf`` (``gguf.mmproj``). Every GGUF is loaded
by llama.cpp and made to generate one token before the stage finishes (the projector with the image in
``recipes/data/smoke.png``), so a file no client can load never reaches the store.

    python -m steps.convert demo                 # run the convert stage of recipes/demo.yaml
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps import constants as C
from steps import toolchain
from steps.errors import RecipeError, StepFailed
from steps.stage import Declaration
from steps.stage import Stage
from steps.files import read_json

if TYPE_CHECKING:
    from steps.stage import Context

logger = logging.getLogger(__name__)


def build(ctx: Context) -> None:
    stage = ctx.stage
    chain = toolchain.locate()
    if "source" in stage.params:                               # a source model, evaluated beside the merge
        from steps.fetch import source_dir
        merged = source_dir(stage, stage.params["source"])
    else:                                                      # merged/, or healed/ for the healed variant
        merged = stage.build_dir / stage.params["model"]
    name = stage.outputs[0]
    classes = toolchain.converter_classes(merged)
    if "error" in classes["text"]:
        raise StepFailed(f"llama.cpp's converter has no text model for {merged}: {classes['text']['error']}")
    mtp_args, ctx.record["mtp"] = mtp_plan(stage, merged, bool(classes["text"]["mtp"]))
    provenance = _provenance(ctx)
    raw = ctx.out.parent / f"raw-{name}"
    toolchain.run([sys.executable, str(chain.converter), str(merged), "--outtype", stage.params["outtype"],
                   "--outfile", str(raw), "--model-name", stage.name, *mtp_args],
                  what=f"convert {stage.recipe.name}", env=chain.converter_env())
    add_metadata(raw, ctx.out / name, provenance)
    raw.unlink()
    toolchain.smoke_load(ctx.out / name)
    ctx.record["main"] = toolchain.split_gguf(ctx.out / name, stage.params.get("split_max_size"))[0].name
    if stage.params["mmproj"] == "off" or not has_vision(merged):
        return
    if "error" in classes["mmproj"]:
        raise RecipeError(str(stage.recipe.file), "gguf.mmproj", f"the merged model has a vision tower, but "
                          f"llama.cpp's converter writes no projector for it ({classes['mmproj']['error']}); set "
                          "gguf.mmproj: off to convert the text model alone")
    outtype = stage.params["mmproj_outtype"]
    proj = C.MMPROJ_GGUF.format(recipe=stage.name, outtype=outtype.upper())
    raw = ctx.out.parent / f"raw-{proj}"
    toolchain.run([sys.executable, str(chain.converter), str(merged), "--mmproj", "--outtype", outtype,
                   "--outfile", str(raw), "--model-name", stage.name],
                  what=f"convert {stage.recipe.name} (vision projector)", env=chain.converter_env())
    add_metadata(raw, ctx.out / proj, provenance)
    raw.unlink()
    toolchain.smoke_load(ctx.out / name, mmproj=ctx.out / proj, image=SMOKE_IMAGE)
    ctx.record["mmproj"] = proj


SMOKE_IMAGE = Path(__file__).resolve().parent.parent / "recipes" / "data" / "smoke.png"
MTP_TOP = ("fc.weight", "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight", "norm.weight")


def _provenance(ctx: Context) -> dict[str, str]:
    stage = ctx.stage
    sources = read_json(stage.target.with_name(f"fetch.{stage.recipe.name}.json")).get("sources", {})
    return {
        C.GGUF_KEY_RECIPE: stage.recipe.name,
        C.GGUF_KEY_STAGE: ctx.key,
        C.GGUF_KEY_SOURCES: json.dumps({k: {"kind": v["kind"], "revision": v["revision"],
                                            **({"package": v["package"]} if "package" in v else {}),
                                            **({"repo": v["repo"]} if "repo" in v else {})}
                                        for k, v in sources.items()}, sort_keys=True),
        C.GGUF_KEY_VERSION: str(C.SCHEMA_VERSION),
    }


def has_vision(model_dir: Path) -> bool:
    """A vision tower: a vision config and tensors outside the language model that carry it."""
    from steps.tensors import ModelReader
    config = json.loads((model_dir / "config.json").read_text())
    if not isinstance(config.get("vision_config"), dict):
        return False
    reader = ModelReader(model_dir)
    try:
        return any(n.split(".")[0] in ("visual", "vision_tower", "vision_model") or ".visual." in n
                   for n in reader.tensors)
    finally:
        reader.close()


def mtp_plan(stage: Stage, model_dir: Path, supports_mtp: bool) -> tuple[list[str], dict[str, Any]]:
    """The converter flags for the model's multi-token-prediction head, and what was decided (for the record).

    ``gguf.mtp``: ``keep`` converts a complete ``mtp.*`` set and refuses anything else; ``drop`` converts without
    it; ``auto`` (default) keeps a complete set and otherwise converts without MTP, saying so. A checkpoint saved
    through transformers keeps ``mtp_num_hidden_layers`` in its config but no ``mtp.*`` tensors: converted as is,
    the GGUF would claim a block it does not hold and llama.cpp would refuse to load it.
    """
    from steps.tensors import ModelReader
    mode = stage.params["mtp"]
    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    declared = int(text.get("mtp_num_hidden_layers") or config.get("mtp_num_hidden_layers") or 0)
    reader = ModelReader(model_dir)
    names = list(reader.tensors)
    reader.close()
    mtp = {n.removeprefix("model.").removeprefix("mtp.") for n in names if n.startswith(("mtp.", "model.mtp."))}
    if not supports_mtp and not mtp:
        return [], {"mode": mode, "kept": False, "reason": "the architecture has no MTP head"}
    problem = _mtp_problem(mtp, declared, names, text)
    if mode == "keep" and problem:
        raise RecipeError(str(stage.recipe.file), "gguf.mtp", f"keep asks for the MTP head, but {problem}; set "
                          "gguf.mtp: drop (or auto) to convert the model without it")
    if mode == "drop" or problem:
        if not supports_mtp:
            raise RecipeError(str(stage.recipe.file), "gguf.mtp", "the merged model holds mtp.* tensors but "
                              "llama.cpp's converter has no MTP support for its architecture; remove them from the "
                              "sources")
        reason = "gguf.mtp: drop" if mode == "drop" else problem
        if mode == "auto":
            logger.info("convert %s: %s: converting without MTP (--no-mtp; gguf.mtp: auto)", stage.recipe.name,
                        problem)
        return ["--no-mtp"], {"mode": mode, "kept": False, "reason": reason}
    return [], {"mode": mode, "kept": True, "layers": declared or _mtp_layers(mtp)}


def _mtp_layers(mtp: set[str]) -> int:
    return len({int(n.split(".")[1]) for n in mtp if n.startswith("layers.") and n.split(".")[1].isdigit()})


def _mtp_problem(mtp: set[str], declared: int, names: list[str], text: dict[str, Any]) -> str | None:
    """Why the model's MTP set cannot be converted, or None when it is complete."""
    if not mtp:
        return (f"the config declares mtp_num_hidden_layers: {declared} but the model holds no mtp.* tensors"
                if declared else "the model holds no mtp.* tensors")
    layers = declared or _mtp_layers(mtp)
    wanted = set(MTP_TOP)
    full = _full_attention_suffixes(names, text)
    for i in range(layers):
        wanted |= {f"layers.{i}.{suffix}" for suffix in full}
    missing = sorted(wanted - mtp)
    if missing:
        shown = ", ".join(f"mtp.{m}" for m in missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4
                                                               else "")
        return f"its MTP set is partial ({len(mtp)} mtp.* tensors; missing {shown})"
    return None


def _full_attention_suffixes(names: list[str], text: dict[str, Any]) -> set[str]:
    """The tensor suffixes of a full-attention decoder layer: what each MTP layer holds."""
    import re
    types = text.get("layer_types") or []
    index = types.index("full_attention") if "full_attention" in types else 0
    pattern = re.compile(rf"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.{index}\.(.+)$")
    return {m.group(1) for n in names if (m := pattern.match(n))}


def add_metadata(src: Path, dest: Path, values: dict[str, str]) -> None:
    """Copy a GGUF file with extra string key/values; tensor data is streamed, never decoded."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(src)
    arch_field = reader.get_field("general.architecture")
    if arch_field is None:
        raise ValueError(f"{src}: no general.architecture")
    writer = GGUFWriter(dest, arch=arch_field.contents(), endianess=reader.endianess)
    alignment = reader.get_field("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in values:
            continue
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    for key, value in values.items():
        writer.add_string(key, value)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()


def read_metadata(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    from gguf import GGUFReader
    reader = GGUFReader(path)
    out = {}
    for key in keys:
        field = reader.get_field(key)
        if field is not None:
            out[key] = field.contents()
    return out


def estimate_bytes(stage: Stage, inputs: dict[str, dict[str, Any]]) -> int:
    """The merged (or healed) model's weights; twice for f32, less for q8_0."""
    upstream = {dep.split(":", 1)[0]: m for dep, m in inputs.items()}
    made = upstream.get("merge") or upstream["heal"]
    merged = sum(int(i["size"]) for rel, i in made["outputs"].items()
                 if "/" in rel and rel.split("/", 1)[0].split("@")[0] in (C.MERGED_DIR, C.HEALED_DIR))
    return int(merged * {"f32": 2.0, "q8_0": 0.6}.get(str(stage.params.get("outtype")), 1.0))


STAGE = Declaration(build=build, estimate_bytes=estimate_bytes)


if __name__ == "__main__":
    from steps.plan import find
    from steps.store import execute
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    execute(find(f"convert:{sys.argv[1]}"))
