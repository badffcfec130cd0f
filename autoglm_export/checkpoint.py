"""Read a Hugging Face GLM-4.1V checkpoint directory lazily and safely.

* Headers of every safetensors shard are parsed by hand (8-byte length + JSON), so that keys,
  dtypes, shapes and byte ranges are validated against the config, and truncated files are
  caught, before a single tensor is read.
* Tensors are then read one at a time through safetensors' mmap (``safe_open``), in their
  stored dtype unless a caller asks for another. Nothing holds the whole model.
* A checkpoint is untrusted: nothing is unpickled, no code from it runs, and a shard name in the
  index can never point outside the checkpoint directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, excerpt
from .fsutil import load_json
from .models import family_for_config, family_of
from .models.family import ModelFamily

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BF16": (torch.bfloat16, 2),
    "F16": (torch.float16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}


@dataclass(frozen=True)
class TensorInfo:
    key: str  # name as stored in the shard
    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][1]


@dataclass
class Checkpoint:
    root: Path
    spec: Any  # the family's spec (models/<family>/spec.py)
    config: dict
    tensors: dict[str, TensorInfo]  # canonical key -> where it is stored
    generation_config: dict = field(default_factory=dict)

    @property
    def family(self) -> ModelFamily:
        return family_of(self.spec)

    @property
    def tokenizer_path(self) -> Path:
        return self.root / "tokenizer.json"

    def chat_tokenizer(self):
        from .host.tokenizer import ChatTokenizer

        return ChatTokenizer(self.tokenizer_path, self.spec.tokens, self.spec.audio)

    def tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (mmap), optionally cast. The caller owns and releases it."""
        info = self.tensors.get(key)
        if info is None:
            raise CheckpointError(
                "tensor not in checkpoint", file=self.root, field=key, fix="use the checkpoint's original shards"
            )
        from safetensors import safe_open

        # a handle per read: safetensors maps the whole shard, and every page a read touched stays
        # resident (and counted) for as long as the map lives; open for one tensor, it goes with it
        t = safe_open(str(info.file), framework="pt", device="cpu").get_tensor(info.key)
        if t.is_floating_point() and not _all_finite(t):
            nan = int(torch.isnan(t).sum())
            raise CheckpointError(
                "weight holds non-finite values",
                file=info.file,
                field=info.key,
                expected="finite numbers",
                got=f"{nan:,} NaN and {int(torch.isinf(t).sum()):,} infinite of {t.numel():,}",
                fix="the checkpoint is damaged (or diverged in training); re-download it or use another one",
            )
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def files(self) -> list[Path]:
        names = {
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "preprocessor_config.json",
            INDEX_FILE,
            "chat_template.jinja",
            "tokenizer_config.json",
        }
        out = [self.root / n for n in sorted(names) if (self.root / n).is_file()]
        out += sorted({i.file for i in self.tensors.values()})
        return out

    def fingerprint(self) -> str:
        """sha256 over every file the export reads, in a fixed order (streamed, 1 MiB at a time)."""
        h = hashlib.sha256()
        for f in self.files():
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        return h.hexdigest()


def containment_root(root: Path) -> Path:
    """Where a checkpoint's files may resolve to: the directory itself, or for a Hugging Face cache
    snapshot (``models--ORG--NAME/snapshots/REV``, files symlinked into ``../../blobs``) that model's
    cache directory."""
    real = root.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def checked_file(root: Path, path: Path, field: str) -> Path:
    """The one rule for every file read from a checkpoint (config, tokenizer, index, shards):
    symlinks are followed, and the target must stay inside ``containment_root``."""
    try:
        path.resolve().relative_to(containment_root(root))
    except ValueError:
        raise CheckpointError(
            "file resolves outside the checkpoint directory",
            file=path,
            field=field,
            expected=f"a file inside {containment_root(root)}",
            got=excerpt(str(path.resolve())),
            fix="copy the file into the checkpoint directory (symlinks may point inside it, or inside the "
            "models--*/ directory of a Hugging Face cache snapshot)",
        ) from None
    return path


def _inside(root: Path, name: str, index_file: Path) -> Path:
    """Resolve a shard name from the index, refusing anything outside the checkpoint."""
    bad = (
        not isinstance(name, str)
        or not name
        or name.startswith(("/", "\\"))
        or "\\" in name
        or any(part in ("..", "") for part in name.split("/"))
    )
    if bad:
        raise CheckpointError(
            "shard name escapes the checkpoint directory",
            file=index_file,
            field="weight_map",
            expected="a file name inside the checkpoint directory",
            got=repr(name),
            fix="this index is unsafe; re-download the checkpoint",
        )
    return checked_file(root, root / name, f"weight_map (from {INDEX_FILE})")


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    fix = "the file is damaged; re-download this shard"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError("truncated safetensors file (no header)", file=path, fix=fix)
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(
                "truncated or corrupt safetensors header",
                file=path,
                got=f"header length {n}, file size {size}",
                fix=fix,
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError("corrupt safetensors header (not JSON)", file=path, fix=fix) from None
    if not isinstance(header, dict):
        raise CheckpointError("corrupt safetensors header", file=path, fix=fix)
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError("corrupt safetensors entry", file=path, field=excerpt(key), fix=fix) from None
        if not all(_is_index(d) for d in shape) or not (_is_index(begin) and _is_index(end)):
            raise CheckpointError(
                "corrupt safetensors entry",
                file=path,
                field=excerpt(key),
                expected="non-negative integer shape and data_offsets",
                got=excerpt(f"shape {meta['shape']!r}, data_offsets {meta['data_offsets']!r}"),
                fix=fix,
            )
        if dtype not in DTYPES:
            raise CheckpointError(
                "unsupported tensor dtype", file=path, field=key, expected="|".join(DTYPES), got=dtype, fix=fix
            )
        info = TensorInfo(key=key, file=path, dtype=dtype, shape=shape)
        if end - begin != info.nbytes or begin < 0:
            raise CheckpointError(
                "tensor byte range does not match its shape", file=path, field=key, got=f"{begin}..{end}", fix=fix
            )
        if end > data_len:
            raise CheckpointError(
                "truncated safetensors file",
                file=path,
                field=key,
                expected=f"{8 + n + end} bytes",
                got=f"{size} bytes",
                fix=fix,
            )
        out[key] = info
    # tensors may not share bytes: a crafted header could alias one weight onto another
    spans = sorted((m["data_offsets"][0], m["data_offsets"][1], k) for k, m in header.items() if k != "__metadata__")
    for (_, end_a, key_a), (begin_b, _, key_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(
                "overlapping tensor byte ranges",
                file=path,
                field=excerpt(key_b),
                got=f"starts at {begin_b}, inside {excerpt(key_a, 60)} (ends at {end_a})",
                fix=fix,
            )
    return out


FINITE_CHECK_ELEMENTS = 1 << 24  # isfinite's bool temporary per slice: 16 MB, not a byte per weight


def _all_finite(t: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(part).all()) for part in t.reshape(-1).split(FINITE_CHECK_ELEMENTS))


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _shard_files(root: Path) -> list[Path]:
    index_file = root / INDEX_FILE
    if index_file.is_file():
        checked_file(root, index_file, INDEX_FILE)
        index = load_json(index_file, "safetensors index", "re-download the checkpoint index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(
                "index has no weight_map", file=index_file, field="weight_map", fix="re-download the checkpoint index"
            )
        shards = []
        for _key, name in weight_map.items():
            path = _inside(root, name, index_file)
            if path not in shards:
                shards.append(path)
        for path in shards:
            if not path.is_file():
                raise CheckpointError(
                    "shard named in the index is missing",
                    file=path,
                    field=f"weight_map (from {INDEX_FILE})",
                    fix="download every shard listed in the index into the checkpoint directory",
                )
        return shards
    single = root / SINGLE_FILE
    if single.is_file():
        return [checked_file(root, single, SINGLE_FILE)]
    raise CheckpointError(
        "no weights found",
        file=root,
        expected=f"{SINGLE_FILE} or {INDEX_FILE} with its shards",
        fix="point --checkpoint at a Hugging Face checkpoint directory with safetensors weights (.bin files are not read)",
    )


def open_checkpoint(path: str | Path, *, require_tokenizer: bool = True) -> Checkpoint:
    """Open and fully validate a checkpoint directory; reads headers only, no tensor data."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(
            "checkpoint directory not found", file=root, fix="pass the directory that holds config.json"
        )
    for name in ("config.json", "generation_config.json", "tokenizer.json", "preprocessor_config.json"):
        if (root / name).exists():
            checked_file(root, root / name, name)
    config_file = root / "config.json"
    config = load_json(config_file, "config.json", "pass a Hugging Face checkpoint directory that has config.json")
    gen_file = root / "generation_config.json"
    generation = (
        load_json(gen_file, "generation_config.json", "copy it from the original checkpoint")
        if gen_file.is_file()
        else {}
    )
    family = family_for_config(config, config_file)
    spec = family.parse_config(config, config_file, generation)

    stored: dict[str, TensorInfo] = {}
    for shard in _shard_files(root):
        for key, info in read_safetensors_header(shard).items():
            stored[family.canonical_key(key)] = info

    expected = family.full_layout(spec)
    missing = [k for k in expected if k not in stored]
    if missing:
        raise CheckpointError(
            f"{len(missing)} tensor(s) missing from the checkpoint",
            file=root,
            field=missing[0],
            expected=f"shape {list(expected[missing[0]])}",
            fix="the shards do not match config.json; re-download the checkpoint",
        )
    for key, shape in expected.items():
        info = stored[key]
        if info.shape != shape:
            raise CheckpointError(
                "tensor shape does not match config.json",
                file=info.file,
                field=key,
                expected=str(list(shape)),
                got=str(list(info.shape)),
                fix="the shards and config.json come from different models; use matching files",
            )
        if not info.dtype.startswith(("F", "BF")):
            raise CheckpointError(
                "weight is not floating point",
                file=info.file,
                field=key,
                got=info.dtype,
                fix="use an unquantized checkpoint",
            )
    if require_tokenizer and not (root / "tokenizer.json").is_file():
        raise CheckpointError(
            "missing tokenizer",
            file=root / "tokenizer.json",
            fix="copy tokenizer.json from the original checkpoint into the checkpoint directory",
        )
    tensors = {k: stored[k] for k in expected}
    return Checkpoint(root=root, spec=spec, config=config, tensors=tensors, generation_config=generation)
