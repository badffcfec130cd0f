"""Load ExecuTorch programs into mapped, unlocked pages, as the Android app does.

ExecuTorch's Python bindings map a ``.pte`` with ``MmapDataLoader`` in ``UseMlockIgnoreErrors``
mode: every segment they load is ``mlock``-ed, so the whole constant segment (the 4-bit
embedding table: 0.33 GiB at 9B widths) and each delegate blob become resident at load, whether
or not a token ever reads them. For a user whose locked-memory limit is the usual 8 MiB the
``mlock`` fails and is ignored; for root (containers), who may lock without limit, it holds
0.4 GiB more than the app, which loads with ``Module.LOAD_MODE_MMAP`` (no ``mlock``). Inside
``mlock_refused`` the calling thread may not lock pages (locked-memory limit 0 and, where it
holds it, ``CAP_IPC_LOCK`` out of its effective set), so the bindings' ``mlock`` fails the same
way and is ignored; both are restored on the way out.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
import sys

_CAP_IPC_LOCK = 14
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capabilities():
    """(libc, header, data) for this thread, or None where they cannot be read (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        header, data = _CapHeader(_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
        if libc.capget(ctypes.byref(header), data) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return libc, header, data


@contextlib.contextmanager
def mlock_refused():
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    lowered = False
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, hard))
        lowered = True
    except (ValueError, OSError):
        pass
    dropped = None
    caps = _capabilities()
    bit = 1 << _CAP_IPC_LOCK
    if caps is not None and caps[2][0].effective & bit:
        libc, header, data = caps
        data[0].effective &= ~bit
        if libc.capset(ctypes.byref(header), data) == 0:
            dropped = caps
    try:
        yield
    finally:
        if dropped is not None:
            libc, header, data = dropped
            data[0].effective |= bit
            libc.capset(ctypes.byref(header), data)
        if lowered:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))
