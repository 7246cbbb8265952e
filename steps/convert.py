"""convert: the merged model as a GGUF, with llama.cpp's own convert_hf_to_gguf.py, plus provenance metadata.

The converter runs in the project's environment with llama.cpp's vendored gguf-py. Afterwards the file is
rewritten once with the ``gguf`` package to add the recipe name, the stage key and the source revisions as
metadata (llama-quantize copies them into every quant); tensor bytes are streamed from a memory map.

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
from steps.store import read_json

if TYPE_CHECKING:
    from steps.store import Context

logger = logging.getLogger(__name__)


def build(ctx: Context) -> None:
    stage = ctx.stage
    chain = toolchain.locate()
    name = stage.outputs[0]
    raw = ctx.out.parent / f"raw-{name}"
    toolchain.run([sys.executable, str(chain.converter), str(stage.build_dir / C.MERGED_DIR),
                   "--outtype", stage.params["outtype"], "--outfile", str(raw), "--model-name", stage.recipe.name],
                  what=f"convert {stage.recipe.name}", env=chain.converter_env())
    sources = read_json(stage.target.with_name(f"fetch.{stage.recipe.name}.json")).get("sources", {})
    provenance = {
        C.GGUF_KEY_RECIPE: stage.recipe.name,
        C.GGUF_KEY_STAGE: ctx.key,
        C.GGUF_KEY_SOURCES: json.dumps({k: {"kind": v["kind"], "revision": v["revision"],
                                            **({"package": v["package"]} if "package" in v else {})}
                                        for k, v in sources.items()}, sort_keys=True),
        C.GGUF_KEY_VERSION: str(C.SCHEMA_VERSION),
    }
    add_metadata(raw, ctx.out / name, provenance)
    raw.unlink()


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


if __name__ == "__main__":
    from steps.plan import find
    from steps.store import execute
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    execute(find(f"convert:{sys.argv[1]}"))
