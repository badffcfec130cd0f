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
