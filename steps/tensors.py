"""Streaming safetensors: a lazy reader over a model's shards and a writer that streams tensor bytes.

The reader parses each shard's header and reads a tensor's bytes at its offset on demand, so peak memory is one
tensor, whatever the model size. The writer takes the whole layout first (names, dtypes, shapes), writes each
shard's header, then streams tensors in order; bytes that need no conversion are copied without decoding.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "U16": 2,
               "U32": 4, "U64": 8, "C64": 8}
TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
MERGEABLE = frozenset(TORCH_DTYPES.values())     # the dtypes a merge computes with; others are copied as bytes
MAX_HEADER_BYTES = 100 << 20                     # the safetensors library's limit
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int            # absolute byte offset in file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A shard's header and the offset its data starts at, validated as the safetensors library does: the header is
    a UTF-8 JSON object inside the file; each tensor has a known dtype, a shape of non-negative integers and
    data_offsets [begin, end] spanning exactly its bytes; sorted by offset, the tensors cover the data with no gap
    or overlap and end where the file ends (a truncated shard is caught here, not when a tensor is read). A problem
    raises a ValueError naming the file, the tensor and what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: file is truncated: {size} bytes, too short for a safetensors header; "
                             "download it again")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: safetensors header of {n} bytes (at most {MAX_HEADER_BYTES} allowed); "
                             "not a safetensors file?")
        if 8 + n > size:
            raise ValueError(f"{path}: file is truncated: the header is {n} bytes, the file holds {size - 8} after "
                             "its length; download it again")
        blob = f.read(n)
    try:
        header = json.loads(blob.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: the header is not valid UTF-8 (byte {exc.start}); not a safetensors file?") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the header is not valid JSON ({exc.msg} at character {exc.pos}); not a "
                         "safetensors file, or a corrupted one: download it again") from None
    except ValueError as exc:                       # a key twice in one object
        raise ValueError(f"{path}: the header {exc}; the file is corrupted: download it again") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is a JSON {type(header).__name__}, not an object; not a safetensors "
                         "file?")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: __metadata__ is not an object of strings; download the file again")
    spans = sorted((*_span(path, name, meta), name) for name, meta in header.items() if name != "__metadata__")
    covered, previous = 0, ""
    for begin, end, name in spans:
        if begin < covered:
            raise ValueError(f"{path}: tensor {name}: data_offsets [{begin}, {end}] overlap tensor {previous} "
                             f"(which ends at {covered}); the file is corrupted: download it again")
        if begin > covered:
            after = f"tensor {previous}" if previous else "the header"
            raise ValueError(f"{path}: tensor {name}: data_offsets [{begin}, {end}] leave bytes {covered} to {begin} "
                             f"after {after} unused; the file is corrupted: download it again")
        covered, previous = end, name
    data = size - 8 - n
    if covered > data:
        raise ValueError(f"{path}: file is truncated: header says {covered} bytes of data, the file holds {data}; "
                         "download it again")
    if covered < data:
        raise ValueError(f"{path}: {data - covered} bytes follow the last tensor's data (the header says {covered} "
                         f"bytes of data, the file holds {data}); the file is corrupted: download it again")
    return header, 8 + n


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"holds {key!r} twice in one object")
        seen[key] = value
    return seen


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _span(path: Path, name: str, meta: Any) -> tuple[int, int]:
    """A header entry's [begin, end], checked against its dtype and shape."""
    where = f"{path}: tensor {name}"
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: the entry is a JSON {type(meta).__name__}, not an object; download the file again")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in meta:
            raise ValueError(f"{where}: the entry has no {key}; download the file again")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"{where}: unsupported dtype {json.dumps(dtype)} (supported: {', '.join(DTYPE_SIZES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ValueError(f"{where}: shape {json.dumps(shape)} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise ValueError(f"{where}: data_offsets {json.dumps(offsets)} is not [begin, end] (two non-negative "
                         "integers)")
    begin, end = offsets
    if begin > end:
        raise ValueError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != nbytes:
        raise ValueError(f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, its shape {shape} of "
                         f"{dtype} needs {nbytes}")
    return begin, end


def read_index(index: Path) -> dict[str, str]:
    """A sharded model's weight_map (tensor name -> shard file), every shard present."""
    try:
        data = json.loads(index.read_bytes())
    except ValueError as exc:
        raise ValueError(f"{index}: not valid JSON ({exc}); download it again") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: no weight_map of tensor names to shard files; download it again")
    missing = sorted({f for f in weight_map.values() if not (index.parent / f).is_file()})
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{index}: shard {missing[0]}{more} listed in weight_map is missing; download it again")
    return weight_map


class ModelReader:
    """Every tensor of a Hugging Face model directory, by name, read lazily."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / INDEX_NAME
        weight_map = read_index(index) if index.exists() else {}
        if weight_map:
            files = sorted({directory / f for f in weight_map.values()})
        else:
            files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{directory}: no *.safetensors files (pickled .bin weights are not loaded)")
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            header, base = read_header(file)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if name in self.tensors:
                    raise ValueError(f"{file}: tensor {name} is also in {self.tensors[name].file.name}; a tensor "
                                     "belongs in one shard: download the model again")
                begin, end = meta["data_offsets"]
                self.tensors[name] = TensorInfo(name, file, meta["dtype"], tuple(meta["shape"]), base + begin,
                                                end - begin)
        for name, shard in weight_map.items():
            if name not in self.tensors or self.tensors[name].file != directory / shard:
                raise ValueError(f"{index}: weight_map puts tensor {name} in {shard}, which does not hold it; "
                                 "download the model again")
        self._handles: dict[Path, Any] = {}

    def raw(self, name: str) -> bytes:
        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = open(info.file, "rb")
        return os.pread(handle.fileno(), info.nbytes, info.start)

    def tensor(self, name: str) -> Any:
        """The tensor, read straight into its own buffer (one copy, no intermediate bytes)."""
        import torch
        info = self.tensors[name]
        dtype = {v: getattr(torch, k) for k, v in TORCH_DTYPES.items()}.get(info.dtype)
        if dtype is None:
            raise ValueError(f"{self.directory}: tensor {name} has dtype {info.dtype}, which cannot be merged")
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = open(info.file, "rb")
            view = memoryview(buffer.numpy())  # type: ignore[arg-type]
            done = 0
            while done < info.nbytes:
                n = os.preadv(handle.fileno(), [view[done:]], info.start + done)
                if n <= 0:
                    raise ValueError(f"{info.file}: truncated reading tensor {name}")
                done += n
        return buffer.view(dtype).reshape(info.shape)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], Any]        # returns exactly nbytes bytes (bytes or any contiguous uint8 buffer)
    inputs: tuple[tuple[str, str], ...] = ()      # the (model, tensor) pairs it is made from

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for dim in self.shape:
            n *= dim
        return n


def shard_layout(tensors: list[OutTensor], shard_bytes: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_model(directory: Path, tensors: list[OutTensor], shard_bytes: int,
                progress: Callable[[int], None] | None = None) -> list[str]:
    """Write tensors as shards (+ index when more than one); returns the shard file names."""
    shards = shard_layout(tensors, shard_bytes)
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    total = 0
    for file_name, shard in zip(names, shards, strict=True):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in shard:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
            weight_map[t.name] = file_name
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(directory / file_name, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for t in shard:
                data = t.produce()
                if len(data) != t.nbytes:
                    raise ValueError(f"tensor {t.name}: produced {len(data)} bytes, expected {t.nbytes}")
                f.write(data)
                total += t.nbytes
                if progress:
                    progress(t.nbytes)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return names


TEXT_CONFIGS = ("text_config", "llm_config", "language_config")   # where multimodal configs keep the text model's


def source_layer_count(model_dir: Path) -> int | None:
    """The decoder depth: the top-level config's, else its text config's (never a vision or audio config's)."""
    config = json.loads((model_dir / "config.json").read_text())
    for cfg in (config, *(config.get(key) or {} for key in TEXT_CONFIGS)):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(cfg.get(key), int):
                return int(cfg[key])
    return None
