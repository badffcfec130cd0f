"""Progress lines on stderr: ``[  12.3s] stage: message``. Quiet mode prints nothing. Third-party
libraries' logging is turned down to errors, so progress lines are what a user reads."""

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


def quiet_third_party_logs() -> None:
    """torchao logs a warning per optional CUDA kernel it cannot load on a CPU machine, and torch
    one per deprecated pytree registration; neither is actionable for a user of this tool."""
    import logging
    import warnings

    for name in (
        "torchao",
        "torch.utils._pytree",
        "torch._export",
        "torch.onnx",
        "onnx_ir",
        "onnxscript",
        "onnxruntime",
        "coremltools",
        "executorch",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    # ExecuTorch modules call logging.basicConfig(level=INFO) on import and its Qualcomm code logs
    # through the root logger; a root handler of our own makes those calls no-ops and keeps what
    # reaches stderr to errors. Our progress output does not go through logging.
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setLevel(logging.ERROR)
        root.addHandler(handler)
    root.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
