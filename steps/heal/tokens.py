"""The tokenized blend the heal trains on: the model's text tokenizer, every source's rows encoded, filtered,
blended by weight and packed (or not), its digest (part of the stage key), and its cache in
``<store>/work/heal-tokens/``."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.hashing import digest_value
from steps.heal.data import _encode_row, _read_text, _Reject, _rows, _text_windows
from steps.heal.paths import _fail, merged_dir, work_root

if TYPE_CHECKING:
    import numpy as np

    from steps.hashing import StatCache
    from steps.stage import Stage

TOKENS_VERSION = 1                 # bump when tokenization or blending changes what it produces


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
    from steps.stage import package_version
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
