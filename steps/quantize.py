"""quantize: llama-quantize to one type, with the recipe's importance matrix when it has one, and the quant
entry's per-tensor options (--output-tensor-type, --token-embedding-type, --tensor-type, --override-kv), so a
bartowski-style ``_L``/``_XL`` variant is one recipe line. The quant is load-checked in llama.cpp before it is kept.

    python -m steps.quantize demo-Q4_K_M         # run one quantize subtask of recipes/demo.yaml
"""
from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from steps import toolchain
from steps.settings import threads
from steps.stage import Declaration

if TYPE_CHECKING:
    from steps.stage import Context, Stage

logger = logging.getLogger(__name__)


def build(ctx: Context) -> None:
    stage = ctx.stage
    chain = toolchain.locate()
    argv = [chain.program("llama-quantize")]
    # Run in build/<recipe>/ with relative input paths: llama-quantize writes the imatrix path it was given into
    # the quant's metadata, and an absolute path would make the bytes depend on where the build lives.
    if stage.recipe.imatrix is not None:
        argv += ["--imatrix", ctx.upstream_file("imatrix")]
    params = stage.params
    for opt in ("output_tensor_type", "token_embedding_type"):
        if opt in params:
            argv += [f"--{opt.replace('_', '-')}", params[opt]]
    for rule in params.get("tensor_type", []):
        argv += ["--tensor-type", rule]
    for kv in params.get("override_kv", []):
        argv += ["--override-kv", kv]
    argv += [ctx.upstream_file("convert"), str(ctx.out / stage.outputs[0]), stage.params["type"], str(threads())]
    toolchain.run(argv, what=f"quantize {stage.name}", cwd=stage.build_dir)
    toolchain.smoke_load(ctx.out / stage.outputs[0])
    ctx.record["main"] = toolchain.split_gguf(ctx.out / stage.outputs[0], params.get("split_max_size"))[0].name


def estimate_bytes(stage: Stage, inputs: dict[str, dict[str, Any]]) -> int:
    """The unquantized GGUF's size (twice for F32)."""
    (convert,) = [m for dep, m in inputs.items() if dep.startswith("convert:")]
    gguf = sum(int(i["size"]) for rel, i in convert["outputs"].items() if "mmproj" not in rel)
    return gguf * (2 if stage.params.get("type") == "F32" else 1)


STAGE = Declaration(build=build, estimate_bytes=estimate_bytes)


if __name__ == "__main__":
    from steps.plan import find
    from steps.store import execute
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    execute(find(f"quantize:{sys.argv[1]}"))
