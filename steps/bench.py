"""bench: one GGUF's figures, ``<variant>[-<NAME>].bench.json`` (the scoreboard stage gathers them): file size,
llama-perplexity PPL on held-out text, and for a quant the KL-divergence of its token distributions against the
unquantized model's, computed from the log-probabilities llama-perplexity saves (the same compressed form its own
--kl-divergence mode reads). The unquantized GGUF's log-probabilities are computed once per variant and kept as an
artifact (``<variant>.logprobs``), so a new quant costs one llama-perplexity run.

    python -m steps.bench demo                   # run the bench stage of recipes/demo.yaml
"""
from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from steps import constants as C
from steps import toolchain
from steps.errors import StepFailed
from steps.files import read_json
from steps.settings import threads
from steps.stage import Declaration
from steps.store import SMALL_OUTPUT

if TYPE_CHECKING:
    from steps.stage import Context, Stage

logger = logging.getLogger(__name__)

_NUM = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
REPORT = {                      # llama-perplexity --kl-divergence's summary lines (for cross-checks)
    "ppl_q":      rf"Mean PPL\(Q\)\s*:\s*{_NUM}",
    "ppl_base":   rf"Mean PPL\(base\)\s*:\s*{_NUM}",
    "kld_mean":   rf"Mean\s+KLD:\s*{_NUM}",
    "same_top_p": rf"Same top p:\s*{_NUM}",
}


def parse_llama_report(output: str) -> dict[str, float]:
    found = {key: re.search(pattern, output) for key, pattern in REPORT.items()}
    return {key: float(m.group(1)) for key, m in found.items() if m}


@dataclass(frozen=True)
class LogProbs:
    """A llama-perplexity ``--kl-divergence-base`` file: per scored position, the log-softmax over the vocabulary,
    stored as two floats (scale, minimum) and one uint16 per token (tools/perplexity/perplexity.cpp)."""
    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray

    @classmethod
    def open(cls, path: Path) -> LogProbs:
        with open(path, "rb") as f:
            if f.read(8) != b"_logits_":
                raise StepFailed(f"{path}: not a llama-perplexity logits file")
            n_ctx, n_vocab, n_chunk = np.frombuffer(f.read(12), dtype="<i4")
        tokens = np.fromfile(path, dtype="<i4", count=int(n_chunk * n_ctx), offset=20)
        return cls(path, int(n_ctx), int(n_vocab), int(n_chunk), tokens)

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(log-probabilities [positions, vocab] as float32, the target token of each position), chunk by chunk."""
        first = self.n_ctx // 2
        n_pos = self.n_ctx - 1 - first
        nv = 2 * ((self.n_vocab + 1) // 2) + 4
        data = np.memmap(self.path, dtype="<u2", mode="r", offset=20 + 4 * self.n_chunk * self.n_ctx)
        if data.size < self.n_chunk * n_pos * nv:
            raise StepFailed(f"{self.path}: truncated logits file ({data.size} of {self.n_chunk * n_pos * nv} values)")
        rows = data[: self.n_chunk * n_pos * nv].reshape(self.n_chunk, n_pos, nv)
        for c in range(self.n_chunk):
            raw = np.asarray(rows[c])
            head = raw[:, :4].copy().view("<f4")              # (scale, min_log_prob) per position
            logp = raw[:, 4: 4 + self.n_vocab].astype(np.float32) * head[:, :1] + head[:, 1:2]
            targets = self.tokens[c * self.n_ctx + first + 1: (c + 1) * self.n_ctx]
            yield logp, targets


def scores(model: LogProbs, base: LogProbs | None) -> dict[str, float]:
    """PPL of a model, and when a base is given, the KL-divergence KL(base || model) and top-token agreement."""
    nll: list[np.ndarray] = []
    kld: list[np.ndarray] = []
    same_top: list[np.ndarray] = []
    delta_p: list[np.ndarray] = []
    if base is not None and not np.array_equal(base.tokens, model.tokens):
        raise StepFailed(f"{model.path} and {base.path} scored different tokens (different tokenizers?)")
    pairs = zip(model.chunks(), base.chunks(), strict=True) if base is not None else ((c, None) for c in model.chunks())
    for (logp, targets), ref in pairs:
        rows = np.arange(len(targets))
        nll.append(-logp[rows, targets].astype(np.float64))
        if ref is not None:
            logp_b = ref[0]
            p_b = np.exp(logp_b)
            kld.append(np.asarray(np.sum(p_b * (logp_b - logp), axis=1, dtype=np.float64)))
            same_top.append(np.argmax(logp, axis=1) == np.argmax(logp_b, axis=1))
            delta_p.append(np.exp(logp[rows, targets]) - p_b[rows, targets])
    all_nll = np.concatenate(nll)
    n = all_nll.size
    out = {"ppl": float(np.exp(all_nll.mean())), "ppl_err": float(np.exp(all_nll.mean()) * all_nll.std() / np.sqrt(n)),
           "tokens": n}
    if kld:
        k = np.concatenate(kld)
        out.update({"kld_mean": float(k.mean()), "kld_mean_err": float(k.std() / np.sqrt(n)),
                    "kld_median": float(np.median(k)), "kld_p99": float(np.percentile(k, 99)),
                    "kld_max": float(k.max()), "same_top_p_percent": float(100 * np.concatenate(same_top).mean()),
                    "delta_p_mean_percent": float(100 * np.concatenate(delta_p).mean())})
    return {key: round(v, 6) if isinstance(v, float) else v for key, v in out.items()}


def logprobs(model: Path, text: Path, params: dict[str, Any], dest: Path) -> LogProbs:
    """Run llama-perplexity once, saving every scored position's log-probabilities (parsed from the file, not
    from the program's log, which it can lose at exit)."""
    chain = toolchain.locate()
    toolchain.run([chain.program("llama-perplexity"), "-m", str(model), "-f", str(text),
                   "-c", str(params["context"]), "--chunks", str(params["chunks"]), "-t", str(threads()),
                   *toolchain.gpu_args(), "--kl-divergence-base", str(dest)], what=f"perplexity {model.name}")
    found = LogProbs.open(dest)
    if found.n_chunk < params["chunks"]:
        raise StepFailed(f"the held-out text gives {found.n_chunk} chunks of {params['context']} tokens for "
                         f"{model.name}, the recipe asks for bench.chunks: {params['chunks']}; use a longer text "
                         "or fewer chunks")
    return found


def build(ctx: Context) -> None:
    """``bench:<variant>``: the unquantized GGUF's PPL, and its log-probabilities kept as the reference;
    ``bench:<variant>-<NAME>``: one quant's PPL and divergence from that reference. Adding a quant runs one
    llama-perplexity, not one per GGUF."""
    stage = ctx.stage
    heldout = stage.files["heldout"]
    out = ctx.out / stage.outputs[0]
    quant_deps = [d for d in stage.deps if d.startswith("quantize:")]
    if not quant_deps:
        name = ctx.upstream_file("convert")
        reference = logprobs(stage.build_dir / name, heldout, stage.params, ctx.out / stage.outputs[1])
        row = _row(name, ctx, {"type": "base", **scores(reference, None)})
    else:
        (dep,) = quant_deps
        name = ctx.upstream_file("quantize")
        reference = LogProbs.open(stage.build_dir / ctx.upstream("bench")["reference"])
        quant = logprobs(stage.build_dir / name, heldout, stage.params, ctx.out.parent / "quant.logprobs")
        row = _row(name, ctx, {"type": dep.rsplit("-", 1)[-1], **scores(quant, reference)})
        quant.path.unlink()
    if len(stage.outputs) > 1:
        ctx.record["reference"] = stage.outputs[1]
    board = {"schema": C.SCHEMA_VERSION, "recipe": stage.recipe.name, "variant": stage.params["variant"],
             "settings": {"heldout_digest": ctx.cache.digest(heldout),
                          **{k: v for k, v in stage.params.items() if k != "variant"}},
             "llama_cpp": stage.tools().get("llama.cpp"), "models": [row]}
    out.write_text(json.dumps(board, indent=1) + "\n")


def _row(name: str, ctx: Context, values: dict[str, Any]) -> dict[str, Any]:
    """A GGUF's row: its size (all parts of a split GGUF) and digest (its first part's)."""
    outputs = next(dep["outputs"] for dep in ctx.inputs.values() if name in dep["outputs"])
    parts = [info for rel, info in outputs.items() if rel.endswith(".gguf") and "mmproj" not in rel]
    return {"file": name, "size": sum(p["size"] for p in parts), "digest": outputs[name]["digest"], **values}


def estimate_bytes(stage: Stage, inputs: dict[str, dict[str, Any]]) -> int:
    """llama-perplexity's saved log-probabilities, the base's and a quant's: chunks x context/2 x vocabulary x 2
    bytes each."""
    config = read_json(next(stage.build_dir.glob(f"{C.MERGED_DIR}*/config.json")))   # a sweep: any cell's
    vocab = int(config.get("vocab_size") or config["text_config"]["vocab_size"])
    context, chunks = int(stage.params["context"]), int(stage.params["chunks"])
    per_model = chunks * context * 4 + chunks * (context - 1 - context // 2) * (2 * ((vocab + 1) // 2) + 4) * 2
    return SMALL_OUTPUT + 2 * per_model


STAGE = Declaration(build=build, estimate_bytes=estimate_bytes)


if __name__ == "__main__":
    from steps.plan import find
    from steps.store import execute
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    execute(find(f"bench:{sys.argv[1]}"))
