"""heal: a (Q)LoRA fine-tune of the merged model that repairs a layer-stacked merge's seam, as a cached stage.

The recipe's ``heal:`` block says how (every key has a default; these are the Qwen3.5 write-up's settings)::

    heal:
      quantization: nf4            # nf4 | int8 | none (plain LoRA on the unquantized weights)
      double_quant: true           # nf4 only: quantize the quantization constants too
      compute_dtype: bfloat16      # float32 | bfloat16 | float16: the base's matmuls and its unquantized weights
      lora: {r: 64, alpha: 32, dropout: 0.05, target_modules: auto, layers: [28, 36]}
      train: {learning_rate: 2.0e-5, schedule: cosine, warmup_steps: 50, batch_size: 2, grad_accum: 4,
              max_steps: 1000, max_length: 4096, save_steps: 250, logging_steps: 10, seed: 0, pack: true,
              gradient_checkpointing: true, weight_decay: 0.0, max_grad_norm: 1.0}
      data:                        # weights are relative shares of the blend's rows
        - {path: data/a.jsonl, weight: 0.7}            # JSONL or Parquet rows
        - {path: data/b.parquet, weight: 0.15, limit: 5000}   # limit: read only the first N rows
        - {text: data/heal.txt, weight: 0.15}          # one continuous text, cut into max_length windows
        - {hf: org/dataset, revision: <40-hex commit>, split: train, name: <config>, weight: 0.1}
      # weights: [0.7, 0.15, 0.15, 0.1]   (instead of a weight: on each entry)

``target_modules: auto`` is every linear layer inside the decoder blocks, read from the model's own module tree
(Llama: q/k/v/o_proj, gate/up/down_proj; Qwen3.5: q/k/v/o_proj, in_proj_qkv/a/b/z, out_proj, gate/up/down_proj);
a list names them instead (``[q_proj, mlp.down_proj]``: a name matches a module path inside a block, or its end);
``layers: [start, end)`` restricts LoRA to the blocks around the seam.

Data. A row is a chat (``messages``: [{role, content}, ...]), a ``prompt``/``response`` pair (plus an optional
``system``) or a ``text``. Chats and pairs are rendered with the merged model's own chat template through its text
tokenizer (AutoTokenizer: a multimodal model's processor is never used), and only the assistant turns' tokens carry
loss (each turn from where it differs from the generation prompt to its end-of-turn marker). Text rows are documents
(BOS, text, EOS); a ``text:`` file is one continuous text cut into windows of max_length tokens, each starting with
BOS as llama-perplexity's chunks do. A chat longer than max_length is dropped (cutting a conversation would train on
half a turn); a long text document is cut into windows. The blend takes round(N * share) rows from each source,
where N is the number of usable rows in all: a source with fewer rows repeats them (each as often as the others,
the remainder drawn without replacement), one with more is subsampled; the rows are then shuffled, all with
generators seeded by ``train.seed``. With ``pack: true`` the shuffled rows are concatenated into blocks of
max_length tokens (attention crosses row boundaries inside a block, as in most packing trainers); otherwise each
row is one example, padded per batch. The digest of the exact token ids and loss masks is part of the stage key
(``key_inputs``), so a changed dataset, weight, filter or chat template reruns the heal and nothing upstream. The
tokenized blend is cached in ``<store>/work/heal-tokens/`` (one file per recipe, keyed by its inputs' digests), so
the key costs a few stat calls once it exists, and build() does not tokenize again.

Training runs transformers' Trainer on peft's LoRA, the base loaded through bitsandbytes (NF4 with double
quantization by default; bitsandbytes 0.50 also runs on the CPU). The examples are laid out in training order ahead
of time (per-epoch permutations seeded by ``train.seed``) and read sequentially, so the order never depends on a
sampler's random state. Checkpoints (adapter, optimizer, scheduler, RNG states) go every save_steps to
``<store>/work/heal.<stage key>/checkpoints``; one that was written completely gets a marker file, and a run killed
at any point resumes from the newest marked checkpoint on the next run (the Trainer restores the adapter, optimizer,
scheduler and RNG states, and skips the batches already trained). On CPU with a fixed thread count the resumed
run's final adapter is bitwise the uninterrupted run's, and so is every logged loss (tests/test_heal.py checks it;
the same test passed on one H100). On CUDA that is not promised in general: cuBLAS and the bitsandbytes kernels are
not guaranteed bitwise deterministic from run to run, so there a resumed adapter equals an uninterrupted one to
within that run-to-run noise. Another thread count (MERGEFORGE_THREADS) changes float summation order on the CPU,
and so the low bits of the adapter.

Outputs (in the stage's store entry, placed in build/<recipe>/):
  adapter/adapter_model.safetensors, adapter/adapter_config.json   peft's own files (PeftModel.from_pretrained)
  loss.json      one object per logged step: step, loss, learning_rate, grad_norm, tokens_per_second
  loss.png       the loss curve
  healed/        the adapter merged into the unquantized merged weights (each LoRA'd weight W + scale * B @ A,
                 computed in float32 and rounded once to W's dtype; every other tensor copied as bytes, so MTP heads
                 and vision towers that transformers would not save are kept), sharded as the merge was, with the
                 merged model's config, tokenizer files and chat template

Several GPUs (data parallel). Set ``MERGEFORGE_HEAL_LAUNCH`` to a launcher command line, e.g.::

    MERGEFORGE_HEAL_LAUNCH="accelerate launch --multi_gpu --num_processes 4" doit heal

The stage then writes its job to the work directory and runs ``<launcher> -m steps.heal train <job.json>`` from the
project root; each process loads the quantized base onto its own GPU (``LOCAL_RANK``), the Trainer wraps the model in
DDP and accelerate shards the sequential example order across the processes, and the main process alone writes
checkpoints and the final adapter, which the stage then turns into its outputs as on one device. ``batch_size`` is
per device, so the global batch is batch_size x grad_accum x processes: a run on four GPUs is a different training
run than on one (and gives other bytes). Without the variable the training runs in the stage's own process, on the
first CUDA device when there is one, else on the CPU with MERGEFORGE_THREADS threads. This multi-GPU path is
not run on several GPUs here (no such machine); the same path runs on the CPU with ``torchrun --standalone
--nproc_per_node 2`` as the launcher (DDP over gloo, tests/test_heal.py), and one heal ran on one H100 as it runs
here. Nothing in the code assumes one process.

    python -m steps.heal recipes/demo.yaml --dry-run    # load everything, count, estimate memory; train nothing
    python -m steps.heal demo                           # run the heal stage of a recipe

The package: schema (the heal: block's keys, defaults and validation), paths (the stage's directories), model (the
LoRA targets, loading and quantizing, adding LoRA), data (the sources' rows and their encoding), tokens (the blend,
its digest and cache), training (the Trainer run and its checkpoints), write (adapter, loss curve, healed model),
cli (the dry run and the command line); this module is the stage itself (key_inputs, build, estimate_bytes).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from steps import constants as C
from steps import settings
from steps.errors import StepFailed
from steps.heal.cli import dry_run, main
from steps.heal.model import (ASIDE, Targets, add_lora, check_model, count_parameters, decoder_prefix, device_name,
                              load_model, model_class, resolve_targets, skeleton)
from steps.heal.paths import merged_dir, work_dir, work_root
from steps.heal.tokens import (TOKENS_VERSION, Tokens, _cache_paths, _inputs_digest, load_tokens, prepare_tokens,
                               text_tokenizer, tokens_digest)
from steps.heal.training import DONE_MARKER, EXTRA_CALLBACKS, latest_checkpoint, train, training_order
from steps.heal.write import plot_loss, write_healed, write_outputs
from steps.recipe.heal import (COMPUTE_DTYPES, DATA_KEYS, DEFAULT_LORA, DEFAULT_TRAIN, HEAL_KEYS, LORA_KEYS,
                               MAX_LENGTH, QUANTIZATIONS, ROW_SUFFIXES, SCHEDULES, TRAIN_KEYS, validate)
from steps.stage import Declaration

if TYPE_CHECKING:
    from steps.hashing import StatCache
    from steps.stage import Context, Stage

__all__ = [
    "ASIDE", "COMPUTE_DTYPES", "DATA_KEYS", "DEFAULT_LORA", "DEFAULT_TRAIN", "DONE_MARKER", "EXTRA_CALLBACKS",
    "HEAL_KEYS", "LORA_KEYS", "MAX_LENGTH", "QUANTIZATIONS", "ROW_SUFFIXES", "SCHEDULES", "TOKENS_VERSION",
    "TRAIN_KEYS", "Targets", "Tokens", "add_lora", "build", "check_model", "count_parameters", "decoder_prefix",
    "device_name", "dry_run", "estimate_bytes", "key_inputs", "latest_checkpoint", "load_model", "load_tokens",
    "main", "merged_dir", "model_class", "plot_loss", "prepare_tokens", "resolve_targets", "skeleton",
    "text_tokenizer", "tokens_digest", "train", "training_order", "validate", "work_dir", "work_root",
    "write_healed", "write_outputs"]

logger = logging.getLogger(__name__)
# bitsandbytes on a CPU without the optional `kernels` package warns about it whenever it is imported; its own CPU
# code is what runs then, and is correct
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def key_inputs(stage: Stage, cache: StatCache) -> dict[str, Any]:
    """The digest of the exact token ids and loss masks the heal trains on (with its row and token counts). When
    the tokenized blend is not cached yet, the LoRA targets are checked against the model first (cheap, and a bad
    target_modules then fails before minutes of tokenizing)."""
    digest = _inputs_digest(stage, cache)
    if not all(p.is_file() for p in _cache_paths(stage, digest)):
        check_model(stage)
    tokens = load_tokens(stage, cache)
    return {"tokens": tokens.digest, "rows": tokens.info["rows"], "tokens_count": tokens.info["tokens_count"]}


# ---------------------------------------------------------------------------------------------- the stage

def build(ctx: Context) -> None:
    from steps.settings import threads
    stage, params = ctx.stage, ctx.stage.params
    model_dir = merged_dir(stage)
    targets = check_model(stage)
    tokens = load_tokens(stage, ctx.cache)
    npz, _ = _cache_paths(stage, _inputs_digest(stage, ctx.cache))
    work = work_dir(ctx.key)
    work.mkdir(parents=True, exist_ok=True)
    (work / "result.json").unlink(missing_ok=True)
    resume, step = latest_checkpoint(work / "checkpoints")
    tok = text_tokenizer(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    job = {"stage": stage.id, "params": params, "merged": str(model_dir), "work": str(work), "tokens": str(npz),
           "targets": {"prefix": targets.prefix, "modules": list(targets.modules), "names": list(targets.names),
                       "layers": list(targets.layers)},
           "resume": str(resume) if resume else None, "resume_step": step, "pad_id": int(pad), "threads": threads()}
    (work / "job.json").write_text(json.dumps(job, indent=1))
    t = params["train"]
    logger.info("%s: %s LoRA r %d on %d modules (%s) of blocks %d..%d; %d examples, %d tokens (%d with loss); "
                "%d steps of %d x %d", stage.id, params["quantization"], params["lora"]["r"], len(targets.modules),
                ", ".join(targets.names), targets.layers[0], targets.layers[-1], len(tokens),
                tokens.info["tokens_count"], tokens.info["label_tokens"], t["max_steps"], t["batch_size"],
                t["grad_accum"])
    launch = settings.heal_launch()
    if launch:
        from steps.settings import root
        cmd = [*shlex.split(launch), "-m", "steps.heal", "train", str(work / "job.json")]
        logger.info("%s: %s", stage.id, " ".join(shlex.quote(c) for c in cmd))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root()),
                                                                          os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(cmd, cwd=root(), env=env)
        if proc.returncode != 0:
            raise StepFailed(f"{stage.id}: the launched training exited with {proc.returncode}: {launch}; the "
                             f"checkpoints in {work} are kept, and the next run resumes from the last one")
    else:
        train(job)
    if not (work / "result.json").is_file():
        raise StepFailed(f"{stage.id}: training ended without its result in {work}")
    result = json.loads((work / "result.json").read_text())
    write_outputs(ctx, work / "final", result)
    total = (tokens.info["tokens_count"], tokens.info["label_tokens"])
    losses = result["losses"]
    ctx.record["heal"] = {
        "steps": result["steps"], "resumed_from": result["resumed_from"], "seconds": result["seconds"],
        "first_loss": losses[0]["loss"] if losses else None, "last_loss": losses[-1]["loss"] if losses else None,
        "trainable_params": result["trainable"], "params": result["total"], "tokens": total[0],
        "label_tokens": total[1], "rows": tokens.info["rows"], "examples": len(tokens),
        "tokens_trained": result["tokens_trained"], "device": result["device"], "world_size": result["world_size"],
        "target_modules": list(targets.names), "lora_modules": len(targets.modules), "layers": list(targets.layers),
        "sources": tokens.info["sources"]}
    shutil.rmtree(work, ignore_errors=True)


def estimate_bytes(stage: Stage) -> int:
    """Disk the stage needs, from the merged model's headers (no torch): the healed copy of the weights, the adapter,
    and in the store's work/ up to three checkpoints (save_total_limit 2, plus the one being written) of the adapter
    and its two Adam moments. The LoRA size is bounded by r x (rows + columns) of every 2-D tensor in the blocks."""
    from steps.tensors import ModelReader, source_layer_count
    model_dir = merged_dir(stage)
    reader = ModelReader(model_dir)
    try:
        weights = sum(i.nbytes for i in reader.tensors.values())
        n = source_layer_count(model_dir) or 0
        from steps.merge import find_layer_prefix
        prefix = find_layer_prefix(list(reader.tensors), n) + "." if n else ""
        r = int(stage.params["lora"]["r"])
        lora = sum(4 * r * (i.shape[0] + i.shape[1]) for i in reader.tensors.values()
                   if prefix and i.name.startswith(prefix) and len(i.shape) == 2)
    finally:
        reader.close()
    return weights + lora + 3 * 3 * lora + (1 << 20)


@lru_cache(maxsize=1)
def heal_machine() -> dict[str, str]:
    """What beyond the recipe changes a heal's bytes, found without importing torch (doit lists tasks often): the
    device kind (CPU and CUDA arithmetic differ) and the launcher (its process count sets the global batch)."""
    from steps import toolchain
    device = settings.cluster_device() if "heal" in settings.cluster_stages() and settings.cluster() else None
    found = {"heal_device": device or ("cuda" if toolchain.has_gpu() else "cpu")}   # a job: the node's device
    launch = settings.heal_launch()
    if launch:
        found["heal_launch"] = launch
    return found


def keyed_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
    """What a downstream key reads of a heal: the healed model only (its loss curve records tokens/s, which differ
    run to run, and must not make the healed variant stale)."""
    return {rel: info for rel, info in outputs.items()
            if "/" in rel and rel.split("/", 1)[0].split("@")[0] == C.HEALED_DIR}


STAGE = Declaration(build=build, key_inputs=key_inputs, estimate_bytes=lambda stage, inputs: estimate_bytes(stage),
                    tools=lambda stage: heal_machine(), keyed_outputs=keyed_outputs)
