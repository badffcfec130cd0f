"""The host runtime loads programs with page locking refused (targets/shared/page_locking.py)."""

import ctypes
import mmap
import resource

from autoglm_export.targets.shared.page_locking import mlock_refused

libc = ctypes.CDLL(None, use_errno=True)


def _mlock_works(buf: mmap.mmap) -> bool:
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    ok = libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(len(buf))) == 0
    if ok:
        libc.munlock(ctypes.c_void_p(addr), ctypes.c_size_t(len(buf)))
    return ok


def test_mlock_fails_inside_and_works_again_after():
    buf = mmap.mmap(-1, 64 * 1024)  # well under the usual 8 MiB locked-memory limit
    limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    assert _mlock_works(buf), "this machine refuses mlock of 64 KiB outside the context; the test cannot tell"
    with mlock_refused():
        assert not _mlock_works(buf)
    assert _mlock_works(buf)
    assert resource.getrlimit(resource.RLIMIT_MEMLOCK) == limit


def test_restores_on_error():
    buf = mmap.mmap(-1, 64 * 1024)
    try:
        with mlock_refused():
            raise KeyError("x")
    except KeyError:
        pass
    assert _mlock_works(buf)
