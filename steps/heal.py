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
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps import constants as C
from steps.errors import MergeforgeError, RecipeError, StepFailed
from steps.hashing import digest_value

if TYPE_CHECKING:
    import numpy as np

    from steps.hashing import StatCache
    from steps.plan import Stage
    from steps.recipe import _Checker
    from steps.store import Context

logger = logging.getLogger(__name__)
# bitsandbytes on a CPU without the optional `kernels` package warns about it whenever it is imported; its own CPU
# code is what runs then, and is correct
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

HEAL_KEYS = ("quantization", "double_quant", "compute_dtype", "lora", "train", "data", "weights")
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "layers")
TRAIN_KEYS = ("learning_rate", "schedule", "warmup_steps", "batch_size", "grad_accum", "max_steps", "max_length",
              "save_steps", "logging_steps", "seed", "pack", "gradient_checkpointing", "weight_decay", "max_grad_norm")
DATA_KEYS = ("path", "text", "hf", "revision", "split", "name", "weight", "limit")
QUANTIZATIONS = ("nf4", "int8", "none")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt")
ROW_SUFFIXES = {".jsonl": "jsonl", ".parquet": "parquet"}
DEFAULT_LORA: dict[str, Any] = {"r": 64, "alpha": 32, "dropout": 0.05, "target_modules": "auto", "layers": None}
DEFAULT_TRAIN: dict[str, Any] = {
    "learning_rate": 2.0e-5, "schedule": "cosine", "warmup_steps": 50, "batch_size": 2, "grad_accum": 4,
    "max_steps": 1000, "max_length": 4096, "save_steps": 250, "logging_steps": 10, "seed": 0, "pack": True,
    "gradient_checkpointing": True, "weight_decay": 0.0, "max_grad_norm": 1.0}
MAX_LENGTH = 1 << 20
TOKENS_VERSION = 1                 # bump when tokenization or blending changes what it produces
DONE_MARKER = "mergeforge-complete"
ASIDE = ("visual", "vision", "mtp", "encoder", "audio")     # numbered blocks that are not the text decoder
_HF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


# ------------------------------------------------------------------------------------------------- validation

def validate(check: _Checker, value: Any, base: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """The recipe's heal: block, normalized with every default filled (it enters the stage key), and the local
    data files by role ("data[0]", ...), whose digests enter the key. Raises check.fail(key, message) for anything
    that can be known wrong without reading the model or the data."""
    from steps.recipe import did_you_mean
    spec = dict(check.mapping(value, "heal", HEAL_KEYS))
    quant = spec.get("quantization", "nf4")
    if quant is False or quant is None:          # YAML reads `off` / `no` as false
        quant = "none"
    if not isinstance(quant, str) or quant.lower() not in QUANTIZATIONS:
        raise check.fail("heal.quantization", f"unknown quantization {quant!r}{did_you_mean(str(quant), QUANTIZATIONS)}"
                         f"; one of {', '.join(QUANTIZATIONS)} (none: plain LoRA on the unquantized weights)")
    quant = quant.lower()
    double = spec.get("double_quant", quant == "nf4")
    check.typed(double, "heal.double_quant", bool, "true or false")
    if double and quant != "nf4":
        raise check.fail("heal.double_quant", f"double quantization is an nf4 setting, and quantization is {quant}; "
                         "remove double_quant or use quantization: nf4")
    dtype = spec.get("compute_dtype", "bfloat16")
    if dtype not in COMPUTE_DTYPES:
        raise check.fail("heal.compute_dtype", f"unknown dtype {dtype!r}{did_you_mean(str(dtype), COMPUTE_DTYPES)}; "
                         f"one of {', '.join(COMPUTE_DTYPES)}")
    params: dict[str, Any] = {"quantization": quant, "double_quant": bool(double), "compute_dtype": dtype,
                              "lora": _lora(check, spec.get("lora")), "train": _train(check, spec.get("train"))}
    data, files = _data(check, spec.get("data"), spec.get("weights"), base)
    params["data"] = data
    return params, files


def _number(check: _Checker, value: Any, key: str, what: str, *, low: float, low_open: bool,
            high: float | None = None, high_open: bool = True) -> float:
    """A finite number in a range; a string YAML did not read as a number (``2e-5``) is read as one."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise check.fail(key, f"expected {what}, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and (value > high or
                                                                             (high_open and value == high))):
        raise check.fail(key, f"expected {what}, got {value!r}")
    return float(value)


def _int(check: _Checker, value: Any, key: str, low: int) -> int:
    what = "a positive integer" if low == 1 else f"an integer >= {low}"
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise check.fail(key, f"expected {what}, got {value!r}")
    return int(value)


def _lora(check: _Checker, value: Any) -> dict[str, Any]:
    spec = {**DEFAULT_LORA, **check.mapping(value if value is not None else {}, "heal.lora", LORA_KEYS)}
    spec["r"] = _int(check, spec["r"], "heal.lora.r", 1)
    spec["alpha"] = _number(check, spec["alpha"], "heal.lora.alpha", "a positive number", low=0, low_open=True)
    spec["dropout"] = _number(check, spec["dropout"], "heal.lora.dropout", "a number in [0, 1)", low=0,
                              low_open=False, high=1)
    targets = spec["target_modules"]
    if targets != "auto":
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not targets:
            raise check.fail("heal.lora.target_modules", f"expected auto or a list of module names such as "
                             f"[q_proj, v_proj], got {targets!r}")
        for j, name in enumerate(targets):
            if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
                raise check.fail(f"heal.lora.target_modules[{j}]", f"expected a module name such as q_proj or "
                                 f"mlp.down_proj, got {name!r}")
            if name in targets[:j]:
                raise check.fail(f"heal.lora.target_modules[{j}]", f"{name} is listed twice; list it once")
        spec["target_modules"] = list(targets)
    layers = spec["layers"]
    if layers is not None:
        if (not isinstance(layers, list) or len(layers) != 2 or not all(type(x) is int for x in layers)
                or not 0 <= layers[0] < layers[1]):
            raise check.fail("heal.lora.layers", f"expected [start, end) with 0 <= start < end (the decoder blocks "
                             f"that get LoRA), got {layers!r}")
        spec["layers"] = list(layers)
    return spec


def _train(check: _Checker, value: Any) -> dict[str, Any]:
    from steps.recipe import did_you_mean
    spec = {**DEFAULT_TRAIN, **check.mapping(value if value is not None else {}, "heal.train", TRAIN_KEYS)}
    spec["learning_rate"] = _number(check, spec["learning_rate"], "heal.train.learning_rate",
                                    "a positive number such as 2.0e-5", low=0, low_open=True)
    if spec["schedule"] not in SCHEDULES:
        s = str(spec["schedule"])
        raise check.fail("heal.train.schedule", f"unknown schedule {s!r}{did_you_mean(s, SCHEDULES)}; one of "
                         f"{', '.join(SCHEDULES)}")
    spec["warmup_steps"] = _int(check, spec["warmup_steps"], "heal.train.warmup_steps", 0)
    spec["seed"] = _int(check, spec["seed"], "heal.train.seed", 0)
    for key in ("batch_size", "grad_accum", "max_steps", "max_length", "save_steps", "logging_steps"):
        spec[key] = _int(check, spec[key], f"heal.train.{key}", 1)
    if not 8 <= spec["max_length"] <= MAX_LENGTH:
        raise check.fail("heal.train.max_length", f"{spec['max_length']} tokens: expected 8 to {MAX_LENGTH}")
    for key in ("pack", "gradient_checkpointing"):
        check.typed(spec[key], f"heal.train.{key}", bool, "true or false")
    spec["weight_decay"] = _number(check, spec["weight_decay"], "heal.train.weight_decay", "a number >= 0",
                                   low=0, low_open=False)
    spec["max_grad_norm"] = _number(check, spec["max_grad_norm"], "heal.train.max_grad_norm",
                                    "a number >= 0 (0: no clipping)", low=0, low_open=False)
    return spec


def _data(check: _Checker, value: Any, weights: Any, base: Path) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    if value is None:
        raise check.fail("heal.data", "missing; list the datasets to heal on, e.g. [{text: data/heal.txt}] or "
                         "[{path: data/chat.jsonl, weight: 0.7}, ...]")
    if not isinstance(value, list) or not value:
        raise check.fail("heal.data", f"expected a list of datasets ({{path: ...}}, {{text: ...}} or {{hf: ...}}), "
                         f"got {value!r}")
    entries: list[dict[str, Any]] = []
    files: dict[str, Path] = {}
    for i, entry in enumerate(value):
        key = f"heal.data[{i}]"
        spec = dict(check.mapping(entry, key, DATA_KEYS))
        kinds = [k for k in ("path", "text", "hf") if k in spec]
        if len(kinds) != 1:
            raise check.fail(key, "give exactly one of path: (a JSONL or Parquet file), text: (a plain text file) "
                             "or hf: (a Hugging Face dataset)")
        kind = kinds[0]
        out: dict[str, Any] = {}
        if kind in ("path", "text"):
            for extra in ("revision", "split", "name"):
                if extra in spec:
                    raise check.fail(f"{key}.{extra}", f"{extra} is for hf: datasets; remove it")
            path = check.existing_file(spec[kind], f"{key}.{kind}", base)
            if kind == "path" and path.suffix.lower() not in ROW_SUFFIXES:
                raise check.fail(f"{key}.path", f"{path.name}: unknown row format {path.suffix!r}; give a .jsonl "
                                 "or .parquet file of rows, or a plain text file as text:")
            if path.stat().st_size == 0:
                raise check.fail(f"{key}.{kind}", f"{path} is empty; give a file with training data")
            out[kind] = spec[kind]
            files[f"data[{i}]"] = path
        else:
            name = spec["hf"]
            if not isinstance(name, str) or not _HF_NAME.fullmatch(name):
                raise check.fail(f"{key}.hf", f"expected a Hugging Face dataset id such as org/name, got {name!r}")
            rev = spec.get("revision")
            if not isinstance(rev, str) or not re.fullmatch(r"[0-9a-f]{40}", rev):
                raise check.fail(f"{key}.revision", f"expected the dataset's 40-hex commit sha, got {rev!r}; a "
                                 "branch or tag moves, and a heal is pinned to its data")
            split = spec.get("split", "train")
            if not isinstance(split, str) or not split:
                raise check.fail(f"{key}.split", f"expected a split name such as train, got {split!r}")
            config = spec.get("name")
            if config is not None and (not isinstance(config, str) or not config):
                raise check.fail(f"{key}.name", f"expected the dataset's configuration name, got {config!r}")
            out.update(hf=name, revision=rev, split=split, name=config)
        if "weight" in spec:
            out["weight"] = _number(check, spec["weight"], f"{key}.weight", "a positive number (a relative share "
                                    "of the blend)", low=0, low_open=True)
        limit = spec.get("limit")
        if kind == "text" and limit is not None:
            raise check.fail(f"{key}.limit", "limit counts rows of a path: or hf: dataset; a text: file is one "
                             "text: remove it")
        if kind != "text":
            out["limit"] = None if limit is None else _int(check, limit, f"{key}.limit", 1)
        entries.append(out)
    given = [i for i, e in enumerate(entries) if "weight" in e]
    if weights is not None:
        if given:
            raise check.fail(f"heal.data[{given[0]}].weight", "give the weights either on each dataset or as "
                             "heal.weights, not both")
        if not isinstance(weights, list) or len(weights) != len(entries):
            n = len(weights) if isinstance(weights, list) else "not a list of"
            raise check.fail("heal.weights", f"{n} weights for {len(entries)} datasets; give one weight per "
                             "dataset, in the order of heal.data")
        for i, w in enumerate(weights):
            entries[i]["weight"] = _number(check, w, f"heal.weights[{i}]", "a positive number (a relative share of "
                                           "the blend)", low=0, low_open=True)
    elif given and len(given) != len(entries):
        missing = next(i for i in range(len(entries)) if i not in given)
        raise check.fail(f"heal.data[{missing}].weight", f"missing, while {len(given)} of the {len(entries)} "
                         "datasets give one; give every dataset a weight, or none (equal shares)")
    for e in entries:
        e.setdefault("weight", 1.0)
    return entries, files


# ---------------------------------------------------------------------------------------------- the model

def work_root() -> Path:
    from steps.plan import store_root
    return store_root() / "work"


def work_dir(key: str) -> Path:
    """Checkpoints of the heal with this stage key: a killed run resumes from here."""
    return work_root() / f"heal.{key}"


def merged_dir(stage: Stage) -> Path:
    return stage.build_dir / C.MERGED_DIR


def _fail(stage: Stage, key: str, message: str) -> RecipeError:
    return RecipeError(str(stage.recipe.file), key, message)


def model_class(model_dir: Path) -> Any:
    """The transformers class the model's config names (a multimodal model's own class, so the adapter's module
    names are those a user loads), else AutoModelForCausalLM."""
    import transformers
    config = json.loads((model_dir / "config.json").read_text())
    for name in config.get("architectures") or ():
        cls = getattr(transformers, str(name), None)
        if cls is not None and hasattr(cls, "from_pretrained"):
            return cls
    return transformers.AutoModelForCausalLM


def decoder_prefix(model: Any, n_layers: int) -> str:
    """The module path of the text decoder's blocks: the ModuleList of n_layers blocks, preferring one named
    layers that is not a vision tower, encoder or MTP head."""
    import torch
    found = [name for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.ModuleList) and len(mod) == n_layers and name]
    if not found:
        raise ValueError(f"no module list of {n_layers} blocks (the config's layer count) in {type(model).__name__}")
    return max(found, key=lambda p: (p.rsplit(".", 1)[-1] == "layers", not any(a in p for a in ASIDE), -len(p)))


@dataclass(frozen=True)
class Targets:
    prefix: str                      # e.g. model.layers
    modules: tuple[str, ...]         # full module names that get LoRA
    names: tuple[str, ...]           # their paths inside a block (self_attn.q_proj, ...), sorted
    layers: tuple[int, ...]

    @property
    def regex(self) -> str:
        """peft's target_modules as one regular expression (fullmatch) naming exactly these modules."""
        return (rf"{re.escape(self.prefix)}\.(?:{'|'.join(str(i) for i in self.layers)})\."
                rf"(?:{'|'.join(re.escape(n) for n in self.names)})")


def resolve_targets(stage_params: dict[str, Any], model: Any, n_layers: int, fail: Any) -> Targets:
    """The linear layers inside the decoder blocks that get LoRA: every one (auto) or those the recipe names,
    in the blocks lora.layers selects. ``fail(key, message)`` makes the RecipeError."""
    import torch
    from steps.recipe import did_you_mean
    lora = stage_params["lora"]
    prefix = decoder_prefix(model, n_layers)
    rng = lora.get("layers")
    if rng is not None and rng[1] > n_layers:
        raise fail("heal.lora.layers", f"{rng} is outside the merged model, which has {n_layers} layers; use a "
                   f"range within [0, {n_layers}]")
    layers = list(range(*rng)) if rng is not None else list(range(n_layers))
    linear: dict[str, list[str]] = {}        # path inside a block -> full names
    others: dict[str, str] = {}              # non-linear module paths -> type
    for name, mod in model.named_modules():
        if not name.startswith(prefix + "."):
            continue
        rest = name[len(prefix) + 1:]
        if "." not in rest:
            continue
        index, rel = rest.split(".", 1)
        if not index.isdigit() or int(index) not in layers:
            continue
        if isinstance(mod, torch.nn.Linear):
            linear.setdefault(rel, []).append(name)
        else:
            others.setdefault(rel, type(mod).__name__)
    if not linear:
        raise fail("heal.lora.layers", f"no linear layer in blocks {layers[0]}..{layers[-1]} of {prefix}")
    wanted = lora["target_modules"]
    if wanted == "auto":
        chosen = sorted(linear)
    else:
        chosen = []
        leaves = sorted({rel.rsplit(".", 1)[-1] for rel in linear} | set(linear))
        for j, t in enumerate(wanted):
            hits = [rel for rel in linear if rel == t or rel.endswith("." + t)]
            if not hits:
                kind = next((typ for rel, typ in others.items() if rel == t or rel.endswith("." + t)), None)
                blocks = "the decoder blocks" if rng is None else f"decoder blocks {layers[0]}..{layers[-1]}"
                why = (f"{t!r} is a {kind}, not a linear layer" if kind else
                       f"no linear layer named {t!r} in {blocks}{did_you_mean(t, leaves)}")
                raise fail(f"heal.lora.target_modules[{j}]", f"{why}; the model's are: "
                           f"{', '.join(sorted({rel.rsplit('.', 1)[-1] for rel in linear}))} (or auto)")
            chosen += [h for h in hits if h not in chosen]
        chosen.sort()
    modules = tuple(sorted((n for rel in chosen for n in linear[rel]), key=_natural))
    used = sorted({int(n[len(prefix) + 1:].split(".", 1)[0]) for n in modules})
    return Targets(prefix, modules, tuple(chosen), tuple(used))


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def skeleton(model_dir: Path) -> Any:
    """The model built from its config on the meta device (no weights, no memory): its module tree."""
    import torch
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return model_class(model_dir)._from_config(config)


def check_model(stage: Stage) -> Targets:
    """lora.target_modules and lora.layers against the merged model's module tree (no weights read)."""
    from steps.recipe import source_layer_count
    model_dir = merged_dir(stage)
    n_layers = source_layer_count(model_dir)
    if n_layers is None:
        raise StepFailed(f"{stage.id}: {model_dir}/config.json has no layer count")
    return resolve_targets(stage.params, skeleton(model_dir), n_layers, lambda k, m: _fail(stage, k, m))


# ---------------------------------------------------------------------------------------------- the data

def text_tokenizer(model_dir: Path) -> Any:
    """The model's text tokenizer. AutoTokenizer, never AutoProcessor: a multimodal model's processor would take
    chat-template tokens for image placeholders. Should a library hand back a processor, take its tokenizer."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    return getattr(tok, "tokenizer", tok)


@dataclass
class Tokens:
    ids: np.ndarray           # int32, every example's tokens one after another
    mask: np.ndarray          # uint8, 1 where the token carries loss
    starts: np.ndarray        # int64, example i is ids[starts[i]:starts[i + 1]]
    info: dict[str, Any]      # digest, rows, tokens_count, label_tokens, per-source statistics

    @property
    def digest(self) -> str:
        return str(self.info["digest"])

    def __len__(self) -> int:
        return len(self.starts) - 1


def tokens_digest(ids: np.ndarray, mask: np.ndarray, starts: np.ndarray) -> str:
    import blake3
    h = blake3.blake3()
    h.update(json.dumps({"v": TOKENS_VERSION, "ids": str(ids.dtype), "n": int(len(ids)),
                         "examples": int(len(starts) - 1)}).encode())
    for arr in (ids.astype("<i4", copy=False), mask.astype("u1", copy=False), starts.astype("<i8", copy=False)):
        h.update(memoryview(arr.tobytes()))
    return h.hexdigest()


def _inputs_digest(stage: Stage, cache: StatCache) -> str:
    """What the tokenized blend depends on: the data entries and files, the tokenizer and chat template files, the
    length/packing/seed settings, the libraries that tokenize and draw, this code's version."""
    from steps.plan import package_version
    model_dir = merged_dir(stage)
    tok_files = {p.name: cache.digest(p) for p in sorted(model_dir.iterdir())
                 if p.is_file() and not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json"}
    train = stage.params["train"]
    return digest_value({
        "v": TOKENS_VERSION, "data": stage.params["data"], "files": {r: cache.digest(p) for r, p in
                                                                     sorted(stage.files.items())},
        "tokenizer": tok_files, "max_length": train["max_length"], "pack": train["pack"], "seed": train["seed"],
        "packages": {p: package_version(p) for p in ("transformers", "tokenizers", "numpy", "datasets", "pyarrow",
                                                     "huggingface_hub", "jinja2")}})


def _cache_paths(stage: Stage, digest: str) -> tuple[Path, Path]:
    folder = work_root() / "heal-tokens"
    return folder / f"{stage.name}.{digest}.npz", folder / f"{stage.name}.{digest}.json"


def load_tokens(stage: Stage, cache: StatCache) -> Tokens:
    """The tokenized blend, from the cache when its inputs are unchanged, else made (and cached)."""
    import numpy as np
    digest = _inputs_digest(stage, cache)
    npz, meta = _cache_paths(stage, digest)
    if meta.is_file() and npz.is_file():
        try:
            info = json.loads(meta.read_text())
            with np.load(npz, allow_pickle=False) as z:
                return Tokens(z["ids"], z["mask"], z["starts"], info)
        except (OSError, ValueError, KeyError):
            pass                                     # unreadable: make it again
    tokens = prepare_tokens(stage)
    npz.parent.mkdir(parents=True, exist_ok=True)
    for old in npz.parent.glob(f"{stage.name}.*"):   # one cached blend per recipe
        other = old.name[len(stage.name) + 1:].split(".")[0]
        if len(other) == 64 and other != digest:
            old.unlink(missing_ok=True)
    tmp = npz.with_name(f".{npz.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, ids=tokens.ids, mask=tokens.mask, starts=tokens.starts)
    os.replace(tmp, npz)
    meta.write_text(json.dumps(tokens.info, indent=1, sort_keys=True))   # written last: marks the pair complete
    return tokens


def key_inputs(stage: Stage, cache: StatCache) -> dict[str, Any]:
    """The digest of the exact token ids and loss masks the heal trains on (with its row and token counts). When
    the tokenized blend is not cached yet, the LoRA targets are checked against the model first (cheap, and a bad
    target_modules then fails before minutes of tokenizing)."""
    digest = _inputs_digest(stage, cache)
    if not all(p.is_file() for p in _cache_paths(stage, digest)):
        check_model(stage)
    tokens = load_tokens(stage, cache)
    return {"tokens": tokens.digest, "rows": tokens.info["rows"], "tokens_count": tokens.info["tokens_count"]}


class _Reject(Exception):
    """A row that cannot be trained on, and why (counted per source)."""


def prepare_tokens(stage: Stage) -> Tokens:
    """Read every source, render and tokenize its rows, filter, blend by weight, pack or not (see the module
    docstring). A source with no usable row is a RecipeError naming it."""
    import numpy as np
    params = stage.params
    train = params["train"]
    max_length, seed = train["max_length"], train["seed"]
    tok = text_tokenizer(merged_dir(stage))
    pools: list[list[tuple[np.ndarray, np.ndarray]]] = []
    stats: list[dict[str, Any]] = []
    for i, entry in enumerate(params["data"]):
        key = f"heal.data[{i}]"
        examples: list[tuple[np.ndarray, np.ndarray]] = []
        rejected: dict[str, int] = {}
        read = 0
        if "text" in entry:
            read = 1
            examples = _text_windows(tok, _read_text(stage, stage.files[f"data[{i}]"], f"{key}.text"), max_length)
            if not examples:
                rejected["no tokens"] = 1
        else:
            for row in _rows(stage, i, entry):
                read += 1
                try:
                    examples += _encode_row(stage, tok, row, max_length, key)
                except _Reject as exc:
                    rejected[str(exc)] = rejected.get(str(exc), 0) + 1
        if not examples:
            why = "; ".join(f"{n} {reason}" for reason, n in sorted(rejected.items(), key=lambda kv: -kv[1]))
            where = f"{key}.{next(k for k in ('path', 'text', 'hf') if k in entry)}"
            raise _fail(stage, where, f"no usable rows ({read} read{': ' + why if why else ''}); give rows with "
                        "messages (with an assistant turn), prompt/response or text, each at most "
                        f"heal.train.max_length = {max_length} tokens")
        pools.append(examples)
        stats.append({"source": _describe(entry), "read": read, "usable": len(examples), "rejected": rejected,
                      "weight": entry["weight"]})
    total = sum(len(p) for p in pools)
    weight_sum = sum(e["weight"] for e in params["data"])
    picked: list[tuple[int, int]] = []
    for i, pool in enumerate(pools):
        want = max(1, round(total * params["data"][i]["weight"] / weight_sum))
        rng = np.random.default_rng([seed, i])
        rows = [j for _ in range(want // len(pool)) for j in range(len(pool))]
        rows += sorted(rng.choice(len(pool), want % len(pool), replace=False).tolist())
        picked += [(i, j) for j in rows]
        stats[i]["selected"] = want
    order = np.random.default_rng([seed]).permutation(len(picked))
    blend = [pools[i][j] for i, j in (picked[k] for k in order)]
    ids = np.concatenate([e[0] for e in blend]).astype(np.int32)
    mask = np.concatenate([e[1] for e in blend]).astype(np.uint8)
    if train["pack"]:
        starts = np.append(np.arange(0, len(ids), max_length, dtype=np.int64), len(ids))
        if len(starts) > 2 and starts[-1] - starts[-2] < 2:      # a last block of one token predicts nothing
            ids, mask, starts = ids[:starts[-2]], mask[:starts[-2]], starts[:-1]
    else:
        starts = np.cumsum([0] + [len(e[0]) for e in blend], dtype=np.int64)
    info = {"digest": tokens_digest(ids, mask, starts), "rows": len(blend), "examples": int(len(starts) - 1),
            "tokens_count": int(len(ids)), "label_tokens": int(mask.sum()), "sources": stats,
            "max_length": max_length, "pack": train["pack"]}
    return Tokens(ids, mask, starts, info)


def _describe(entry: dict[str, Any]) -> str:
    if "hf" in entry:
        return f"hf:{entry['hf']}@{entry['revision'][:12]}:{entry['split']}"
    return str(entry.get("path") or entry.get("text"))


def _read_text(stage: Stage, path: Path, key: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(stage, key, f"{path} is not UTF-8 text (byte offset {exc.start}); save it as UTF-8") from None


def _rows(stage: Stage, i: int, entry: dict[str, Any]) -> Any:
    """The rows (dicts) of a JSONL, Parquet or Hugging Face dataset source, at most ``limit``."""
    limit = entry.get("limit")
    if "hf" in entry:
        rows = _hf_rows(stage, i, entry)
    else:
        path = stage.files[f"data[{i}]"]
        key = f"heal.data[{i}].path"
        rows = _jsonl_rows(stage, path, key) if path.suffix.lower() == ".jsonl" else _parquet_rows(stage, path, key)
    for n, row in enumerate(rows):
        if limit is not None and n >= limit:
            return
        yield row


def _jsonl_rows(stage: Stage, path: Path, key: str) -> Any:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise _fail(stage, key, f"{path}: line {n} is not UTF-8; save the file as UTF-8") from None
            except ValueError as exc:
                raise _fail(stage, key, f"{path}: line {n} is not valid JSON ({exc}); fix or remove that line "
                            "(one JSON object per line)") from None


def _parquet_rows(stage: Stage, path: Path, key: str) -> Any:
    import pyarrow.parquet as pq
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
        raise _fail(stage, key, f"{path} is not a readable Parquet file ({exc}); write it again") from None
    for batch in table.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _hf_rows(stage: Stage, i: int, entry: dict[str, Any]) -> Any:
    """A Hugging Face dataset at its pinned revision, from the local hub cache (what `hf download --repo-type
    dataset` writes, under HF_HOME / HF_HUB_CACHE); the hub itself is not contacted."""
    import tempfile

    import datasets
    from huggingface_hub import snapshot_download
    key = f"heal.data[{i}].hf"
    repo, rev = entry["hf"], entry["revision"]
    try:
        snapshot = snapshot_download(repo, repo_type="dataset", revision=rev, local_files_only=True)
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and kin: not in the cache
        from huggingface_hub import constants
        raise _fail(stage, key, f"{repo} at revision {rev[:12]} is not in the local Hugging Face cache "
                    f"({constants.HF_HUB_CACHE}); hub access is not supported yet (no network here): run `hf download "
                    f"--repo-type dataset {repo} --revision {rev}` where there is network and copy the cache, or "
                    "export the rows to JSONL and give it as path:") from None
    with tempfile.TemporaryDirectory(prefix="heal-hf-") as tmp:
        try:
            ds = datasets.load_dataset(snapshot, entry.get("name"), split=entry["split"], cache_dir=tmp)
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds (missing split, bad files, ...)
            raise _fail(stage, key, f"cannot read {repo}@{rev[:12]} split {entry['split']!r} from {snapshot}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        yield from ds


def _text_windows(tok: Any, text: str, max_length: int) -> list[tuple[Any, Any]]:
    """One continuous text as windows of max_length tokens, each starting with BOS when the tokenizer adds one."""
    import numpy as np
    body = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = [tok.bos_token_id] if _adds_bos(tok) else []
    step = max_length - len(bos)
    out = []
    for s in range(0, len(body), step):
        window = np.asarray(bos + body[s:s + step], dtype=np.int32)
        if len(window) > len(bos) + 1:                      # a window of one token teaches nothing
            out.append((window, np.ones(len(window), dtype=np.uint8)))
    return out


def _adds_bos(tok: Any) -> bool:
    if tok.bos_token_id is None:
        return False
    probe = tok("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tok.bos_token_id


def _content(value: Any) -> str:
    """A message's content: a string, or a list of parts of which only text parts are kept."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        if any(p.get("type") not in ("text", None) for p in value):
            raise _Reject("with image or audio content (text only)")
        return "".join(str(p.get("text", "")) for p in value)
    raise _Reject("with a message content that is not text")


def _encode_row(stage: Stage, tok: Any, row: Any, max_length: int, key: str) -> list[tuple[Any, Any]]:
    import numpy as np
    if not isinstance(row, dict):
        raise _Reject("not an object")
    if row.get("messages") is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                     for m in messages):
            raise _Reject("with messages that are not a list of {role, content}")
        messages = [{"role": m["role"], "content": _content(m.get("content", ""))} for m in messages]
        return [_encode_chat(stage, tok, messages, max_length, key)]
    if row.get("prompt") is not None or row.get("response") is not None:
        prompt, response = row.get("prompt"), row.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
            raise _Reject("with prompt/response that are not two non-empty strings")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if isinstance(row.get("system"), str) and row["system"]:
            messages.insert(0, {"role": "system", "content": row["system"]})
        return [_encode_chat(stage, tok, messages, max_length, key)]
    if row.get("text") is not None:
        text = row["text"]
        if not isinstance(text, str) or not text.strip():
            raise _Reject("with an empty text")
        ids = tok(text, add_special_tokens=True, verbose=False)["input_ids"]
        if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
            ids = ids + [tok.eos_token_id]
        arr = np.asarray(ids, dtype=np.int32)
        pieces = [arr[s:s + max_length] for s in range(0, len(arr), max_length)]
        return [(p, np.ones(len(p), dtype=np.uint8)) for p in pieces if len(p) > 1]
    raise _Reject("without messages, prompt/response or text")


def _render(tok: Any, messages: list[dict[str, str]], generation: bool) -> str:
    return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation))


def _encode_chat(stage: Stage, tok: Any, messages: list[dict[str, str]], max_length: int,
                 key: str) -> tuple[Any, Any]:
    """A conversation rendered with the model's chat template; loss on each assistant turn, from where its
    rendering departs from the generation prompt (after the role header) to the end of the turn (its end-of-turn
    marker included). A turn the template renders differently inside the whole conversation than on its own
    (some templates drop earlier turns' reasoning) carries no loss; the last one always does."""
    import numpy as np
    if not getattr(tok, "chat_template", None):
        raise _fail(stage, key, "chat rows need a chat template, and the merged model has none (no "
                    "chat_template.jinja, no chat_template in tokenizer_config.json); set merge.chat_template, or "
                    "give text rows")
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant" and m["content"].strip()]
    if not turns:
        raise _Reject("without an assistant turn")
    try:
        full = _render(tok, messages, False)
        spans = []
        for k in turns:
            before, through = _render(tok, messages[:k], True), _render(tok, messages[:k + 1], False)
            if not full.startswith(through):
                continue
            start = len(os.path.commonprefix([before, through]))
            spans.append((start, len(through)))
    except Exception as exc:  # noqa: BLE001 - jinja raises template errors of many kinds
        raise _Reject(f"that the chat template cannot render ({type(exc).__name__})") from None
    if not spans:
        raise _Reject("whose assistant turns the chat template does not render consistently")
    if getattr(tok, "is_fast", False):
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        mask = [int(any(s <= a < e for s, e in spans)) for a, _ in enc["offset_mapping"]]
    else:                                     # no offsets: tokenize the spans and what lies between them apart
        ids, mask, pos = [], [], 0
        for s, e in spans:
            for text, label in ((full[pos:s], 0), (full[s:e], 1)):
                piece = tok(text, add_special_tokens=False)["input_ids"] if text else []
                ids += piece
                mask += [label] * len(piece)
            pos = e
        tail = tok(full[pos:], add_special_tokens=False)["input_ids"] if full[pos:] else []
        ids += tail
        mask += [0] * len(tail)
    if len(ids) > max_length:
        raise _Reject("longer than max_length")
    if not any(mask):
        raise _Reject("whose assistant turns have no tokens")
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- training

def device_name() -> str:
    """Where this process trains: its own CUDA device under a launcher (LOCAL_RANK), the first one, or the CPU."""
    import torch
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def load_model(params: dict[str, Any], model_dir: Path, device: str) -> Any:
    """The merged model for training: quantized as the recipe says (bitsandbytes NF4/int8, on ``device``) or in
    compute_dtype, every base weight frozen."""
    import torch
    from transformers import BitsAndBytesConfig
    dtype = getattr(torch, params["compute_dtype"])
    kwargs: dict[str, Any] = {"dtype": dtype}
    if params["quantization"] == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=params["double_quant"],
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
    elif params["quantization"] == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if "quantization_config" in kwargs:
        kwargs["device_map"] = {"": device}
    model = model_class(model_dir).from_pretrained(model_dir, **kwargs)
    for p in model.parameters():
        p.requires_grad_(False)
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = False
    return model


def add_lora(params: dict[str, Any], model: Any, targets: Targets) -> Any:
    import transformers
    from peft import LoraConfig, get_peft_model
    lora, train = params["lora"], params["train"]
    if train["gradient_checkpointing"]:
        kwargs = {"use_reentrant": False}              # non-reentrant: works with frozen inputs and under DDP
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:                                           # transformers < 5.x's name
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    transformers.set_seed(train["seed"])          # LoRA's initial A matrices
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=targets.regex, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, all) parameters; a 4-bit weight counts its elements, not its packed bytes."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            n = math.prod(p.quant_state.shape) if getattr(p, "quant_state", None) is not None else 2 * n
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def training_order(n_examples: int, needed: int, seed: int) -> list[int]:
    """The examples in the order training reads them: per-epoch permutations (seeded) until ``needed``."""
    import numpy as np
    order: list[int] = []
    epoch = 0
    while len(order) < needed:
        order += np.random.default_rng([seed, 1 + epoch]).permutation(n_examples).tolist()
        epoch += 1
    return order[:needed]


def train(job: dict[str, Any]) -> None:
    """Train the adapter described by a job (written by build()): in build's own process, or in each process
    of a launcher such as `accelerate launch`. Writes <work>/final/ (adapter) and <work>/result.json (main
    process)."""
    import numpy as np
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    params, work = job["params"], Path(job["work"])
    t = params["train"]
    device = device_name()
    if device == "cpu":                     # MERGEFORGE_THREADS shared by the processes a launcher starts here
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, int(job.get("threads") or 1) // local))
    with np.load(job["tokens"], allow_pickle=False) as z:
        ids, mask, starts = z["ids"], z["mask"], z["starts"]
    targets = Targets(job["targets"]["prefix"], tuple(job["targets"]["modules"]), tuple(job["targets"]["names"]),
                      tuple(job["targets"]["layers"]))
    model = add_lora(params, load_model(params, Path(job["merged"]), device), targets)
    args = TrainingArguments(
        output_dir=str(work / "checkpoints"), max_steps=t["max_steps"], per_device_train_batch_size=t["batch_size"],
        gradient_accumulation_steps=t["grad_accum"], learning_rate=t["learning_rate"],
        lr_scheduler_type=t["schedule"], warmup_steps=t["warmup_steps"], weight_decay=t["weight_decay"],
        max_grad_norm=t["max_grad_norm"], logging_steps=t["logging_steps"], logging_first_step=True,
        save_strategy="steps", save_steps=t["save_steps"], save_total_limit=2, seed=t["seed"], data_seed=t["seed"],
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        use_cpu=device == "cpu", optim="adamw_torch", ddp_find_unused_parameters=False,
        dataloader_pin_memory=device != "cpu")
    world = max(1, args.world_size)
    per_step = t["batch_size"] * t["grad_accum"] * world
    order = training_order(len(starts) - 1, t["max_steps"] * per_step, t["seed"])
    lengths = np.diff(starts)
    step_tokens = lengths[np.asarray(order, dtype=np.int64)].reshape(t["max_steps"], per_step).sum(axis=1)
    pad_id = job["pad_id"]

    class Examples(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(order)

        def __getitem__(self, i: int) -> dict[str, Any]:
            k = order[i]
            return {"ids": ids[starts[k]:starts[k + 1]], "mask": mask[starts[k]:starts[k + 1]]}

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(b["ids"]) for b in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for r, b in enumerate(batch):
            n = len(b["ids"])
            row = torch.from_numpy(b["ids"].astype(np.int64))
            input_ids[r, :n] = row
            labels[r, :n] = torch.where(torch.from_numpy(b["mask"].astype(bool)), row, torch.tensor(-100))
            attention[r, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}

    class HealTrainer(Trainer):
        mark: tuple[float, int] = (0.0, 0)

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None
                                                      else self.train_dataset)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                now, step = time.perf_counter(), self.state.global_step
                seconds, tokens = now - self.mark[0], int(step_tokens[self.mark[1]:step].sum())
                logs["tokens_per_second"] = round(tokens / seconds, 1) if seconds > 0 else 0.0
                self.mark = (now, step)
            super().log(logs, start_time)

    class Checkpoints(TrainerCallback):
        """Marks a checkpoint complete once the Trainer has written all of it (a kill mid-save leaves it
        unmarked, and the next run resumes from the one before)."""

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                (folder / DONE_MARKER).write_text(json.dumps({"step": state.global_step}) + "\n")
                logger.info("%s: checkpoint at step %d", job["stage"], state.global_step)

    progress = _Progress(job["stage"], t["max_steps"], job["resume_step"])
    trainer = HealTrainer(model=model, args=args, train_dataset=Examples(), data_collator=collate,
                          callbacks=[Checkpoints(), progress, *EXTRA_CALLBACKS])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    started = time.perf_counter()
    trainer.mark = (started, job["resume_step"])
    if job["resume"]:
        logger.info("%s: resuming from %s (step %d of %d)", job["stage"], Path(job["resume"]).name,
                    job["resume_step"], t["max_steps"])
    trainer.train(resume_from_checkpoint=job["resume"])
    if trainer.is_world_process_zero():
        final = work / "final"
        shutil.rmtree(final, ignore_errors=True)
        trainer.model.save_pretrained(final)
        trainable, total = count_parameters(trainer.model)
        losses = [{"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate"),
                   "grad_norm": e.get("grad_norm"), "tokens_per_second": e.get("tokens_per_second")}
                  for e in trainer.state.log_history if "loss" in e]
        result = {"losses": losses, "trainable": trainable, "total": total, "resumed_from": job["resume_step"],
                  "seconds": round(time.perf_counter() - started, 3), "world_size": world, "device": device,
                  "steps": trainer.state.global_step,
                  "tokens_trained": int(step_tokens[job["resume_step"]:trainer.state.global_step].sum())}
        tmp = work / "result.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, work / "result.json")


EXTRA_CALLBACKS: list[Any] = []      # more TrainerCallbacks (tests use one to stop a run at a given step)


class _Progress:
    """Step, loss, tokens/s and ETA: a tqdm bar on a terminal, a log line every logging_steps elsewhere."""

    def __new__(cls, *args: Any) -> Any:       # a TrainerCallback, made here so that importing this module is cheap
        from transformers import TrainerCallback

        class Progress(TrainerCallback):
            def __init__(self, name: str, max_steps: int, start: int) -> None:
                self.name, self.max_steps, self.start = name, max_steps, start
                self.bar: Any = None
                self.began = 0.0
                self.tty = sys.stderr.isatty()

            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                self.began = time.perf_counter()
                if self.tty and state.is_world_process_zero:
                    from tqdm import tqdm
                    self.bar = tqdm(total=self.max_steps, initial=self.start, desc=self.name, unit="step")

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if self.bar is not None:
                    self.bar.update(state.global_step - self.bar.n)

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
                if not state.is_world_process_zero or not logs or "loss" not in logs:
                    return
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{logs.get('tokens_per_second', 0):.0f}")
                    return
                done = state.global_step - self.start
                eta = (time.perf_counter() - self.began) / done * (self.max_steps - state.global_step) if done else 0
                grad = logs.get("grad_norm")
                logger.info("%s: step %d/%d loss %.4f lr %.3g grad %s %.0f tok/s eta %s", self.name,
                            state.global_step, self.max_steps, logs["loss"], logs.get("learning_rate", 0),
                            f"{grad:.3g}" if grad is not None else "-", logs.get("tokens_per_second", 0),
                            _duration(eta))

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if self.bar is not None:
                    self.bar.close()

        return Progress(*args)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def latest_checkpoint(folder: Path) -> tuple[Path | None, int]:
    """The newest checkpoint the Trainer finished writing (marked), and its step; unmarked ones (a kill during a
    save) are removed."""
    best: tuple[int, Path] | None = None
    for path in folder.glob("checkpoint-*") if folder.is_dir() else ():
        m = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if not m or not path.is_dir():
            continue
        if not (path / DONE_MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)
            continue
        if best is None or int(m.group(1)) > best[0]:
            best = (int(m.group(1)), path)
    return (best[1], best[0]) if best else (None, 0)


# ---------------------------------------------------------------------------------------------- the stage

def build(ctx: Context) -> None:
    from steps.plan import threads
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
    launch = os.environ.get("MERGEFORGE_HEAL_LAUNCH", "").strip()
    if launch:
        from steps.plan import root
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


def write_outputs(ctx: Context, final: Path, result: dict[str, Any]) -> None:
    """adapter/, loss.json, loss.png and healed/ into the stage's output directory."""
    adapter = ctx.out / "adapter"
    adapter.mkdir()
    shutil.copyfile(final / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    config = json.loads((final / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = C.MERGED_DIR        # build/<recipe>/merged, not this machine's path
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (ctx.out / "loss.json").write_text(json.dumps(result["losses"], indent=1) + "\n")
    plot_loss(result["losses"], ctx.out / "loss.png", ctx.stage.id)
    shard_bytes = int(ctx.stage.recipe.merge.get("shard_bytes", C.DEFAULT_SHARD_BYTES))
    write_healed(merged_dir(ctx.stage), adapter, ctx.out / getattr(C, "HEALED_DIR", "healed"), shard_bytes)


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


def estimate_bytes(stage: Stage) -> int:
    """Disk the stage needs, from the merged model's headers (no torch): the healed copy of the weights, the adapter,
    and in the store's work/ up to three checkpoints (save_total_limit 2, plus the one being written) of the adapter
    and its two Adam moments. The LoRA size is bounded by r x (rows + columns) of every 2-D tensor in the blocks."""
    from steps.recipe import source_layer_count
    from steps.tensors import ModelReader
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


# ---------------------------------------------------------------------------------------------- dry run, CLI

def dry_run(stage: Stage, cache: StatCache, out: Any = None) -> dict[str, Any]:
    """Load the tokenizer, the data, and the model with its quantization and LoRA; print trainable parameters,
    token counts and a memory estimate; train nothing. Returns the figures."""
    out = out or sys.stdout
    started = time.perf_counter()
    model_dir = merged_dir(stage)
    if not (model_dir / "config.json").is_file():
        raise MergeforgeError(f"{stage.id}: no merged model at {model_dir}; run `doit merge:{stage.recipe.name}` "
                              "first")
    params, t = stage.params, stage.params["train"]
    targets = check_model(stage)
    tokens = load_tokens(stage, cache)
    device = device_name()
    model = add_lora(params, load_model(params, model_dir, device), targets)
    trainable, total = count_parameters(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    cfg = model.config
    text = getattr(cfg, "text_config", None) or cfg
    hidden, layers = int(getattr(text, "hidden_size", 0)), int(getattr(text, "num_hidden_layers", 0))
    vocab = int(getattr(text, "vocab_size", 0))
    inter = int(getattr(text, "intermediate_size", 0) or 4 * hidden)
    longest = int(max(tokens.starts[1:] - tokens.starts[:-1]))
    seq = t["batch_size"] * min(longest, t["max_length"])
    act_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[params["compute_dtype"]]
    if t["gradient_checkpointing"]:      # each block's input kept, one block's activations recomputed at a time
        activations = seq * hidden * layers * act_bytes + seq * (12 * hidden + 3 * inter) * act_bytes
    else:                                # about 12 hidden-sized and 3 intermediate-sized tensors per block
        activations = seq * (12 * hidden + 3 * inter) * act_bytes * layers
    logits = seq * vocab * (act_bytes + 4 + 4)            # logits, their float32 copy and its gradient
    optimizer = trainable * (4 + 4 + 8)                  # gradients, and Adam's two moments (the weights are above)
    estimate = weights + optimizer + activations + logits
    per_step = t["batch_size"] * t["grad_accum"]
    figures = {"model": type(model.get_base_model()).__name__, "device": device,
               "quantization": params["quantization"], "trainable_params": trainable, "params": total,
               "lora_modules": len(targets.modules), "target_modules": list(targets.names),
               "layers": [targets.layers[0], targets.layers[-1] + 1], "rows": tokens.info["rows"],
               "examples": len(tokens), "tokens": tokens.info["tokens_count"],
               "label_tokens": tokens.info["label_tokens"], "sources": tokens.info["sources"],
               "examples_per_step": per_step, "epochs": round(t["max_steps"] * per_step / max(1, len(tokens)), 2),
               "memory": {"weights": weights, "optimizer_and_grads": optimizer, "activations": activations,
                          "logits": logits, "total": estimate},
               "seconds": round(time.perf_counter() - started, 2)}
    print(f"{stage.id}: {figures['model']} on {device}, {params['quantization']}"
          + (" + double quantization" if params["double_quant"] else "") + f", compute {params['compute_dtype']}",
          file=out)
    print(f"  LoRA r {params['lora']['r']} alpha {params['lora']['alpha']:g} on {len(targets.modules)} modules "
          f"({', '.join(targets.names)}) in blocks {targets.layers[0]}..{targets.layers[-1]}", file=out)
    print(f"  trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f} %)", file=out)
    for s in tokens.info["sources"]:
        rej = ", ".join(f"{n} {r}" for r, n in s["rejected"].items())
        print(f"  data {s['source']}: {s['read']} read, {s['usable']} usable, {s['selected']} in the blend "
              f"(weight {s['weight']:g}){'; rejected: ' + rej if rej else ''}", file=out)
    print(f"  blend: {tokens.info['rows']} rows -> {len(tokens)} examples "
          f"({'packed' if t['pack'] else 'padded'}, max_length {t['max_length']}), {tokens.info['tokens_count']:,} "
          f"tokens, {tokens.info['label_tokens']:,} with loss; {t['max_steps']} steps x {per_step} examples = "
          f"{figures['epochs']} epochs", file=out)
    mem = figures["memory"]
    print(f"  memory estimate ({'GPU' if device != 'cpu' else 'RAM'}): weights {_size(mem['weights'])}, grads and "
          f"optimizer {_size(mem['optimizer_and_grads'])}, activations {_size(mem['activations'])}, logits "
          f"{_size(mem['logits'])}: about {_size(mem['total'])} (rough: the allocator's overhead and kernels' "
          "workspaces come on top)", file=out)
    print(f"  nothing trained ({figures['seconds']} s)", file=out)
    return figures


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _find_stage(arg: str) -> Stage:
    from steps.plan import find, plan
    from steps.recipe import load
    path = Path(arg)
    if path.is_file():
        stages = [s for s in plan(load(path)) if s.kind == "heal"]
        if not stages:
            raise MergeforgeError(f"{path}: the recipe has no heal: block")
        return stages[0]
    try:
        return find(arg if arg.startswith("heal:") else f"heal:{arg}")
    except KeyError:
        raise MergeforgeError(f"no recipe named {arg!r} with a heal: block (give a recipe file or a recipe "
                              "name)") from None


def main(argv: list[str]) -> int:
    import argparse

    from steps.errors import user_message
    parser = argparse.ArgumentParser(prog="python -m steps.heal", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="a recipe file or name; or `train <job.json>` (what a launcher runs)")
    parser.add_argument("job", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help="load and count everything, train nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.recipe == "train" and args.job:
            train(json.loads(Path(args.job).read_text()))
            return 0
        stage = _find_stage(args.recipe)
        if args.dry_run:
            from steps.store import stat_cache
            cache = stat_cache()
            dry_run(stage, cache)
            cache.save()
        else:
            from steps.store import execute
            execute(stage)
    except MergeforgeError as exc:
        print(user_message(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
