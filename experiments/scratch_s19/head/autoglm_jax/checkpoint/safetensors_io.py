"""Streaming reader and writer for the safetensors format (tensor by tensor, bounded host memory).

Format: an 8-byte little-endian header length, a JSON header mapping names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of the header), then the
raw little-endian bytes. Sharded checkpoints add ``model.safetensors.index.json`` (``weight_map``:
name -> file). Reads use plain file reads into a fresh buffer, so host memory holds one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing files, unexpected/missing/mis-shaped tensors."""


def _read_header(path: Path) -> dict[str, TensorInfo]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        header = json.loads(f.read(n))
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry['dtype']}; allowed: {sorted(DTYPES)}")
        begin, end = entry["data_offsets"]
        infos[name] = TensorInfo(path, DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + n + begin, end - begin)
    return infos


class SafetensorsReader:
    """Reads the tensors of a directory of ``*.safetensors`` files (with or without the index file)."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.exists():
            files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{directory}: no *.safetensors files (and no {INDEX_FILE})")
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{directory}: the index names files that do not exist: {missing}")
        self.infos: dict[str, TensorInfo] = {}
        for f in files:
            self.infos.update(_read_header(f))

    def names(self) -> list[str]:
        return list(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def read(self, name: str) -> np.ndarray:
        info = self.infos[name]
        out = np.empty(info.shape, info.dtype)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = f.readinto(view)
        if got != info.nbytes:
            raise CheckpointError(f"{info.file}: tensor {name!r} is truncated ({got} of {info.nbytes} bytes)")
        return out


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


def write_safetensors(directory: str | os.PathLike, specs: list[TensorSpec],
                      produce: Callable[[str], np.ndarray], *, max_shard_bytes: int = 4 << 30,
                      progress: Callable[[Iterable], Iterable] = iter) -> list[Path]:
    """Writes tensors one at a time: ``produce(name)`` is called once per tensor, in ``specs`` order.

    Files are split at ``max_shard_bytes`` (``model-00001-of-0000N.safetensors`` + index), or a single
    ``model.safetensors`` when everything fits in one.
    """
    directory = Path(directory)
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        nbytes = int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    it = progress(range(len(specs)))
    counter = iter(it)
    for fname, shard in zip(names, shards):
        header, offset = {}, 0
        for s in shard:
            nbytes = int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
            header[s.name] = {"dtype": DTYPE_NAMES[np.dtype(s.dtype)], "shape": list(s.shape),
                              "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[s.name] = fname
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(directory / fname, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for s in shard:
                arr = np.ascontiguousarray(produce(s.name))
                if arr.shape != tuple(s.shape) or arr.dtype != np.dtype(s.dtype):
                    raise CheckpointError(f"tensor {s.name!r}: produced {arr.dtype}{list(arr.shape)}, "
                                          f"declared {np.dtype(s.dtype)}{list(s.shape)}")
                f.write(arr.tobytes())
                total += arr.nbytes
                next(counter, None)
    if len(shards) > 1:
        (directory / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [directory / n for n in names]
