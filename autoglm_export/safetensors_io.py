"""Streaming safetensors writer: header first (computed from shapes), then one tensor at a time.

``safetensors.save_file`` needs every tensor of a shard in memory at once; this writer needs
only the tensor being written, so a full-width 9B-shaped checkpoint can be produced on a small
machine. Output is byte-compatible with the safetensors format (8-byte length, JSON header
padded with spaces to 8 bytes, little-endian data).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

_NAMES = {torch.bfloat16: ("BF16", 2), torch.float16: ("F16", 2), torch.float32: ("F32", 4)}


def write_safetensors(
    path: Path,
    entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    make: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write ``entries`` (name, shape, dtype) to ``path``; ``make(name)`` produces each tensor."""
    entries = list(entries)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * _NAMES[dtype][1]
        header[name] = {"dtype": _NAMES[dtype][0], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in entries:
            t = make(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name}: produced {tuple(t.shape)} {t.dtype}, declared {shape} {dtype}")
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
            del t
    return 8 + len(raw) + offset
