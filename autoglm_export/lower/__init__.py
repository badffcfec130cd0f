"""Backend registry. Each target lives in its own module, imported only when asked for, so a
missing toolchain for one target never breaks another; an unknown name lists the valid ones."""

from __future__ import annotations

import importlib

from ..errors import ExportError

BACKENDS = {
    "xnnpack": "autoglm_export.lower.xnnpack",
    "onnx": "autoglm_export.lower.onnxrt",
    "onnx-qnn": "autoglm_export.lower.onnx_qnn",
    "qnn": "autoglm_export.lower.qnn",
    "coreml": "autoglm_export.lower.coreml",
}


def get_backend(target: str):
    if target in BACKENDS:
        return importlib.import_module(BACKENDS[target]).BACKEND
    raise ExportError(
        "unknown target", field="--target", expected=" | ".join(BACKENDS), got=repr(target),
        fix="pick one of the listed targets",
    )  # fmt: skip


def open_bundle_runtime(backend, bundle, manifest: dict):
    """``backend.open_runtime`` on a bundle whose manifest passed ``load_bundle``: a program the
    runtime cannot load (truncated, or re-hashed after tampering) is a one-line bundle error."""
    from ..errors import BundleError, excerpt

    try:
        return backend.open_runtime(bundle, manifest)
    except ExportError:
        raise
    except Exception as e:  # the runtimes raise RuntimeError, ValueError, their own types
        raise BundleError(f"the runtime cannot load this bundle ({e.__class__.__name__}: "
                          f"{excerpt(str(e).strip().splitlines()[0] if str(e).strip() else '', 160)})",
                          file=bundle, fix="re-export the bundle with autoglm-export") from None  # fmt: skip
