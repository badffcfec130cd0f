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
}
PLANNED = {
    "coreml": "Core ML for the A17 Pro Neural Engine",
}


def get_backend(target: str):
    if target in BACKENDS:
        return importlib.import_module(BACKENDS[target]).BACKEND
    if target in PLANNED:
        raise ExportError(
            f"target '{target}' ({PLANNED[target]}) is not implemented in this version",
            field="--target",
            expected=" | ".join(BACKENDS),
            fix="use one of the implemented targets",
        )
    raise ExportError(
        "unknown target", field="--target", expected=" | ".join([*BACKENDS, *PLANNED]), got=repr(target),
        fix="pick one of the listed targets",
    )  # fmt: skip
