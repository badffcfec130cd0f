"""coremltools, imported only when the coreml target runs, with its noise turned down."""

from __future__ import annotations

import logging
import os
import warnings

from ...errors import BackendUnavailable


def quiet_coremltools() -> None:
    # progress bars per MIL pass (tqdm) would drown our own progress lines
    os.environ["TQDM_DISABLE"] = "1"
    # coremltools warns on import about untested torch / sklearn versions and a missing native
    # runtime (expected on Linux: there is none), and prints progress bars per pass
    for name in ("coremltools", "coremltools.converters", "coremltools.optimize"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="coremltools")


def import_coremltools():
    quiet_coremltools()
    try:
        import coremltools as ct
    except ImportError as e:  # pragma: no cover - pinned in pyproject
        raise BackendUnavailable(
            f"coremltools is not installed ({e}); run `make setup` (pins coremltools==9.0)"
        ) from None
    return ct
