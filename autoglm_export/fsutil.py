"""Write outputs so that nothing is ever half-written, silently overwritten or wrongly deleted.

Everything goes to a hidden staging directory beside the destination (``.<name>.tmp-<pid>-<tag>``)
and is renamed into place only when complete. An existing destination is refused unless ``force``
is given, and even then only when it is what the command itself writes (a bundle, for export) or
an empty directory: ``--force`` never deletes a checkpoint, a recipe, or a directory holding them.

Replacing takes two renames (old -> ``.<name>.old-<pid>-<tag>``, staging -> name). SIGINT and
SIGTERM are held back between them, so Ctrl-C cannot leave the destination missing; a SIGKILL
can, and the next run beside the same destination finishes the job: it puts a dead process's
``.old-`` directory back when the destination is absent and removes dead processes' leftovers.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Callable

from .errors import CheckpointError, ExportError

# errors of the destination's file system that a user fixes by choosing another --out
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)

# outputs renamed into place by this process (the CLI says so when Ctrl-C comes after the rename)
completed: list[Path] = []


def is_bundle(path: Path) -> bool:
    """A directory an earlier export wrote: its manifest says so."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == "autoglm-export bundle"


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def check_output(
    out: Path,
    *,
    force: bool,
    protected: tuple[Path, ...] = (),
    replaceable: Callable[[Path], bool] = is_bundle,
    what: str = "an autoglm-export bundle",
) -> None:
    """Refuse an output path that would destroy anything but an earlier output of the same kind."""
    out = Path(os.path.abspath(out))
    real = out.resolve()
    for p in protected:
        pr = Path(p).resolve()
        if real == pr or real in pr.parents:
            raise ExportError(
                "--out would replace or contain an input of this command",
                file=out,
                field="--out",
                expected=f"a path outside {pr}",
                fix="choose an --out directory that is neither the checkpoint or recipe nor one of their parents",
            )
    if not (out.exists() or out.is_symlink()):
        _probe_writable(out)
        return
    if not force:
        raise ExportError(
            "output already exists", file=out, fix="choose another --out path, delete it, or pass --force to replace it"
        )
    if out.is_symlink() or not out.is_dir():
        raise ExportError(
            "output path exists and is not a directory",
            file=out,
            field="--out",
            fix="choose another --out path; --force replaces only an earlier output directory",
        )
    if not (_is_empty_dir(out) or replaceable(out)):
        raise ExportError(
            "--force refuses to replace a directory that is not an earlier output",
            file=out,
            field="--out",
            expected=f"an empty directory or {what}",
            fix="choose a new --out path; --force replaces only what this command wrote before",
        )


def _probe_writable(out: Path) -> None:
    """Fail before any work when --out cannot be created (read-only or pseudo file system): make and
    remove an empty directory in its nearest existing ancestor."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as e:
        raise _write_error(e, out) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale(out: Path) -> list[str]:
    """Finish or undo what a killed run left beside ``out``; returns what it did, one line each."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(old|tmp)-(\d+)-[0-9a-f]{{8}}")
    done = []
    try:
        # .old- first: an interrupted swap is undone before any staging directory is removed
        entries = sorted(out.parent.iterdir(), key=lambda p: (".tmp-" in p.name, p.name))
    except OSError:
        return done
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m is None or int(m[2]) == os.getpid() or _pid_alive(int(m[2])):
            continue
        if m[1] == "old" and not (out.exists() or out.is_symlink()):
            os.replace(p, out)
            done.append(f"restored {out} from an interrupted replacement ({p.name})")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}, left by a run that was killed (pid {m[2]})")
    return done


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block ends. Python runs signal handlers in the main thread
    only, so a handler that records the signal holds it whichever thread the kernel hands it to
    (a blocked signal mask would not: torch's worker threads would take it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])  # now, to the handler that was there before


def _write_error(e: OSError, out: Path) -> ExportError:
    return ExportError(
        f"cannot write the output ({e.strerror or e.__class__.__name__})",
        file=e.filename or out,
        field="--out",
        fix="choose an --out on a writable file system with enough free space",
    )


@contextlib.contextmanager
def atomic_output_dir(
    out: Path,
    *,
    force: bool = False,
    protected: tuple[Path, ...] = (),
    replaceable: Callable[[Path], bool] = is_bundle,
    what: str = "an autoglm-export bundle",
    on_note: Callable[[str], object] | None = None,
):
    out = Path(os.path.abspath(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for note in recover_stale(out):
            if on_note:
                on_note(note)
        check_output(out, force=force, protected=protected, replaceable=replaceable, what=what)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = out.parent / f".{out.name}.tmp-{tag}"
        tmp.mkdir()
    except OSError as e:
        raise _write_error(e, out) from None
    try:
        yield tmp
        with _signals_held():
            if out.exists() or out.is_symlink():
                old = out.parent / f".{out.name}.old-{tag}"
                os.replace(out, old)
                os.replace(tmp, out)
                completed.append(out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
                completed.append(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in WRITE_ERRNOS:
            raise _write_error(e, out) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_json(path: Path, what: str, fix: str) -> dict:
    """A JSON object from a checkpoint's file, or a one-line error naming it."""
    if not path.is_file():
        raise CheckpointError(f"missing {what}", file=path, fix=fix)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} is not valid JSON ({e.__class__.__name__}: {e})", file=path, fix=fix) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} is not a JSON object", file=path, fix=fix)
    return data
