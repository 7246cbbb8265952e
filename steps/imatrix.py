"""imatrix: llama-imatrix on the recipe's calibration text (its digest is part of the key).

    python -m steps.imatrix demo                 # run the imatrix stage of recipes/demo.yaml
"""
from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from steps import toolchain
from steps.settings import threads
from steps.stage import Declaration

if TYPE_CHECKING:
    from steps.stage import Context

logger = logging.getLogger(__name__)


def build(ctx: Context) -> None:
    stage = ctx.stage
    chain = toolchain.locate()
    gguf = stage.build_dir / ctx.upstream_file("convert")
    # llama-imatrix records the text's path as given (imatrix.datasets, copied into every quant): give it the
    # file's bare name, linked into the stage's work directory, so the bytes do not depend on where the checkout
    # or the store lives.
    calibration = stage.files["calibration"]
    work = ctx.out.parent / "text"
    work.mkdir()
    (work / calibration.name).symlink_to(calibration)
    toolchain.run([chain.program("llama-imatrix"), "-m", str(gguf), "-f", calibration.name,
                   "-o", str(ctx.out / stage.outputs[0]), "--output-format", "gguf",
                   "--chunks", str(stage.params["chunks"]), "-c", str(stage.params["context"]),
                   "-t", str(threads()), "--no-ppl", *toolchain.gpu_args()],
                  what=f"imatrix {stage.recipe.name}", cwd=work)


STAGE = Declaration(build=build)


if __name__ == "__main__":
    from steps.plan import find
    from steps.store import execute
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    execute(find(f"imatrix:{sys.argv[1]}"))
