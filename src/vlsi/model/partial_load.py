"""Reading a slice of rows of one tensor of a safetensors checkpoint, and nothing else of the file.

A process of a sharded run needs only its own rows of each sharded weight. ``safe_open`` maps the whole file
and the pages it touches count towards the process's resident memory until the file is closed; here each
request is one ``seek`` and one ``readinto`` into the destination's own memory (or a buffer of one tensor's
slice when the dtype or the device differ), so what a process reads is what it keeps.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` (offsets from the end of the header), then the
row-major data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import cached_file

__all__ = ["Checkpoint", "StoredTensor"]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie: its file, dtype, shape and the absolute offset of its first byte."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one index of dim 0 (the whole tensor for a scalar)."""
        inner = 1
        for n in self.shape[1:]:
            inner *= n
        return inner * torch.empty((), dtype=self.dtype).element_size()


def _header(file: Path) -> dict[str, StoredTensor]:
    with file.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has dtype {entry['dtype']}, which is not read here")
        begin = 8 + length + entry["data_offsets"][0]
        out[name] = StoredTensor(file, _DTYPES[entry["dtype"]], tuple(entry["shape"]), begin)
    return out


class Checkpoint:
    """The tensors of a checkpoint (a folder or a hub id in the local cache): one ``model.safetensors`` or
    the shards its ``model.safetensors.index.json`` lists."""

    def __init__(self, name: str | Path, file: str | None = None):
        """``file``: read that one file of the folder instead (e.g. ``verbalizers.safetensors``)."""
        if file is not None:
            self.tensors = _header(Path(name) / file)
            return
        index = cached_file(str(name), INDEX_FILE, _raise_exceptions_for_missing_entries=False)
        if index is not None:
            shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
            files = [Path(cached_file(str(name), shard)) for shard in shards]
        else:
            single = cached_file(str(name), SINGLE_FILE, _raise_exceptions_for_missing_entries=False)
            if single is None:
                raise FileNotFoundError(f"{name}: neither {INDEX_FILE} nor {SINGLE_FILE}")
            files = [Path(single)]
        self.tensors: dict[str, StoredTensor] = {}
        for file in files:
            self.tensors.update(_header(file))

    def read_rows(self, name: str, start: int, out: torch.Tensor) -> None:
        """Rows ``start .. start + len(out)`` of dim 0 of tensor ``name`` into ``out`` (the whole tensor for a
        scalar), converted to ``out``'s dtype and device."""
        stored = self.tensors[name]
        rows = out.shape[0] if out.dim() else 1
        expected = (rows, *stored.shape[1:]) if stored.shape else ()
        if tuple(out.shape) != expected or (stored.shape and start + rows > stored.shape[0]):
            raise ValueError(
                f"{name}: rows {start}..{start + rows} of {stored.shape} do not fit {tuple(out.shape)}"
            )
        if out.numel() == 0:
            return
        direct = out.device.type == "cpu" and out.dtype == stored.dtype and out.is_contiguous()
        target = out if direct else torch.empty(out.shape, dtype=stored.dtype)
        view = target.reshape(-1).view(torch.uint8).numpy()
        with stored.file.open("rb", buffering=0) as f:
            f.seek(stored.offset + start * stored.row_bytes)
            done = 0
            while done < view.nbytes:  # readinto may return fewer bytes than asked
                n = f.readinto(memoryview(view)[done:])
                if not n:
                    raise EOFError(f"{stored.file}: {name} ends early")
                done += n
        if not direct:
            out.copy_(target)
