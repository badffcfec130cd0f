"""Finding a module's parameter again in an exported ONNX graph by its content: the exporter
renames and sometimes transposes initializers, so names cannot be trusted (onnx, onnx-qnn)."""

from __future__ import annotations

import hashlib

import numpy as np


def weight_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).data).hexdigest()  # no bytes copy
