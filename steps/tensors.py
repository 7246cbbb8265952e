"""Streaming safetensors: a lazy reader over a model's shards and a writer that streams tensor bytes.

The reader parses each shard's header and reads a tensor's bytes at its offset on demand, so peak memory is one
tensor, whatever the model size. The writer takes the whole layout first (names, dtypes, shapes), writes each
shard's header, then streams tensors in order; bytes that need no conversion are copied without decoding.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
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
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 100 << 20:
            raise ValueError(f"{path}: safetensors header of {size} bytes; not a safetensors file?")
        header = json.loads(f.read(size))
    return header, 8 + size


class ModelReader:
    """Every tensor of a Hugging Face model directory, by name, read lazily."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / INDEX_NAME
        if index.exists():
            files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
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
                begin, end = meta["data_offsets"]
                self.tensors[name] = TensorInfo(name, file, meta["dtype"], tuple(meta["shape"]), base + begin,
                                                end - begin)
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
