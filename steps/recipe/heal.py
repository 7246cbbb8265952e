"""The recipe's heal: block, declared as data: its keys, types, ranges and defaults, and the checks across keys
(datasets, weights, LoRA targets) that can be made without reading the model or the data. The normalized block,
every default filled, enters the heal stage's key; the local data files, by role, enter it by digest."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from steps.recipe.fields import NONE, REQUIRED, Checker, Field, defaults

QUANTIZATIONS = ("nf4", "int8", "none")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt")
ROW_SUFFIXES = {".jsonl": "jsonl", ".parquet": "parquet"}
MAX_LENGTH = 1 << 20
_HF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_SHARE = "a positive number (a relative share of the blend)"

HEAL = {
    "quantization":  Field("choice", "nf4", choices=QUANTIZATIONS, noun="quantization", lower=True,
                           hint="(none: plain LoRA on the unquantized weights)", yaml_bools=("none", "true")),
    "double_quant":  Field("bool"),                         # default: true for nf4
    "compute_dtype": Field("choice", "bfloat16", choices=COMPUTE_DTYPES, noun="dtype"),
    "lora":          Field("any"),
    "train":         Field("any"),
    "data":          Field("any"),
    "weights":       Field("any"),
}
LORA = {
    "r":              Field("int", 64, lo=1),
    "alpha":          Field("number", 32, lo=0, lo_open=True),
    "dropout":        Field("number", 0.05, lo=0, hi=1, hi_open=True),
    "target_modules": Field("any", "auto"),
    "layers":         Field("any"),
}
TRAIN = {
    "learning_rate":          Field("number", 2.0e-5, lo=0, lo_open=True, what="a positive number such as 2.0e-5"),
    "schedule":               Field("choice", "cosine", choices=SCHEDULES, noun="schedule"),
    "warmup_steps":           Field("int", 50, lo=0),
    "seed":                   Field("int", 0, lo=0),
    "batch_size":             Field("int", 2, lo=1),
    "grad_accum":             Field("int", 4, lo=1),
    "max_steps":              Field("int", 1000, lo=1),
    "max_length":             Field("int", 4096, lo=1),
    "save_steps":             Field("int", 250, lo=1),
    "logging_steps":          Field("int", 10, lo=1),
    "pack":                   Field("bool", True),
    "gradient_checkpointing": Field("bool", True),
    "weight_decay":           Field("number", 0.0, lo=0),
    "max_grad_norm":          Field("number", 1.0, lo=0, what="a number >= 0 (0: no clipping)"),
}
DATA = {                                                    # one dataset: exactly one of path, text, hf
    "path":     Field("any"),
    "text":     Field("any"),
    "hf":       Field("any"),
    "revision": Field("any"),
    "split":    Field("any"),
    "name":     Field("any"),
    "weight":   Field("number", NONE, lo=0, lo_open=True, what=_SHARE),
    "limit":    Field("int", NONE, lo=1),
}
HEAL_KEYS, LORA_KEYS, TRAIN_KEYS, DATA_KEYS = tuple(HEAL), tuple(LORA), tuple(TRAIN), tuple(DATA)
DEFAULT_LORA: dict[str, Any] = defaults(LORA)
DEFAULT_TRAIN: dict[str, Any] = defaults(TRAIN)
assert REQUIRED not in DEFAULT_TRAIN.values()


def validate(check: Checker, value: Any, base: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """The recipe's heal: block, normalized with every default filled (it enters the stage key), and the local
    data files by role ("data[0]", ...), whose digests enter the key. Raises check.fail(key, message) for anything
    that can be known wrong without reading the model or the data."""
    raw = dict(check.mapping(value, "heal", HEAL_KEYS))
    if "quantization" in raw and raw["quantization"] is None:      # `quantization:` left empty
        raw["quantization"] = "none"
    spec = check.block(raw, "heal", HEAL)
    quant = spec["quantization"]
    double = quant == "nf4" if spec["double_quant"] is None else spec["double_quant"]
    if double and quant != "nf4":
        raise check.fail("heal.double_quant", f"double quantization is an nf4 setting, and quantization is {quant}; "
                         "remove double_quant or use quantization: nf4")
    params: dict[str, Any] = {"quantization": quant, "double_quant": bool(double),
                              "compute_dtype": spec["compute_dtype"], "lora": _lora(check, spec["lora"]),
                              "train": _train(check, spec["train"])}
    params["data"], files = _data(check, spec["data"], spec["weights"], base)
    return params, files


def _lora(check: Checker, value: Any) -> dict[str, Any]:
    spec = check.block(value, "heal.lora", LORA)
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


def _train(check: Checker, value: Any) -> dict[str, Any]:
    spec = check.block(value, "heal.train", TRAIN)
    if not 8 <= spec["max_length"] <= MAX_LENGTH:
        raise check.fail("heal.train.max_length", f"{spec['max_length']} tokens: expected 8 to {MAX_LENGTH}")
    return spec


def _data(check: Checker, value: Any, weights: Any, base: Path) -> tuple[list[dict[str, Any]], dict[str, Path]]:
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
            out.update(_hf_dataset(check, spec, key))
        if "weight" in spec:
            out["weight"] = check.value(DATA["weight"], spec["weight"], f"{key}.weight")
        limit = spec.get("limit")
        if kind == "text" and limit is not None:
            raise check.fail(f"{key}.limit", "limit counts rows of a path: or hf: dataset; a text: file is one "
                             "text: remove it")
        if kind != "text":
            out["limit"] = None if limit is None else check.value(DATA["limit"], limit, f"{key}.limit")
        entries.append(out)
    _weights(check, entries, weights)
    return entries, files


def _hf_dataset(check: Checker, spec: dict[str, Any], key: str) -> dict[str, Any]:
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
    return {"hf": name, "revision": rev, "split": split, "name": config}


def _weights(check: Checker, entries: list[dict[str, Any]], weights: Any) -> None:
    """Each dataset's share of the blend: given on every dataset, as heal.weights, or none (equal shares)."""
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
            entries[i]["weight"] = check.value(DATA["weight"], w, f"heal.weights[{i}]")
    elif given and len(given) != len(entries):
        missing = next(i for i in range(len(entries)) if i not in given)
        raise check.fail(f"heal.data[{missing}].weight", f"missing, while {len(given)} of the {len(entries)} "
                         "datasets give one; give every dataset a weight, or none (equal shares)")
    for e in entries:
        e.setdefault("weight", 1.0)
