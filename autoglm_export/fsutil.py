"""Write outputs so that nothing is ever half-written or silently overwritten.

Everything goes to a hidden temporary directory beside the destination and is renamed into
place only when complete. An existing destination is refused unless ``force`` is given; with
``force`` the old one is replaced only after the new one is complete. On any exception,
Ctrl-C included, the temporary directory is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path

from .errors import ExportError


def refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ExportError(
            "output already exists",
            file=out,
            fix="choose another --out path, delete it, or pass --force to replace it",
        )


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, force: bool = False):
    out = Path(out)
    refuse_existing(out, force)
    if out.exists() and not out.is_dir():
        raise ExportError("output path is a file, not a directory", file=out, fix="choose another --out path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
