"""The heal's data sources read as rows (a UTF-8 text file, JSONL, Parquet, a Hugging Face dataset from the
local cache), and each row rendered and tokenized: text windows, text documents, chats with loss on the assistant
turns."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.heal.paths import _fail

if TYPE_CHECKING:
    from steps.stage import Stage


class _Reject(Exception):
    """A row that cannot be trained on, and why (counted per source)."""


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
