"""Progress lines on stderr: ``[  12.3s] stage: message``. Quiet mode prints nothing."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, message: str, stage: str | None = None) -> None:
        if self.quiet:
            return
        prefix = f"[{time.perf_counter() - self.t0:7.1f}s] "
        print(prefix + (f"{stage}: " if stage else "") + message, file=sys.stderr, flush=True)

    def stage(self, name: str):
        return lambda msg: self(msg, name)


silent = Progress(quiet=True)  # the default for library callers: same interface, prints nothing
