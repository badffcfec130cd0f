"""The project's own symmetric weight quantizer, the yardstick for Core ML's packed weights.

``coremltools.optimize.coreml.linear_quantize_weights`` writes the bundle's INT4 / INT8 weights;
this module computes what they must be from the checkpoint, independently, so ``verify`` can
compare codes and scales bit for bit (``coreml_checks.weight_checks``) and the PyTorch reference
can use exactly the bundle's weights. Arithmetic is in the weight's own precision (fp16, as the
converted program holds it): scale = 2·max|w| / (qmax − qmin) per block, code = round-half-even
(w / scale), clipped to the symmetric range [−(2^(b−1) − 1), 2^(b−1) − 1].
"""

from __future__ import annotations

import numpy as np

BITS = {"int4": 4, "int8": 8}


def block_shape(shape: tuple[int, ...], group_size) -> tuple[int, int]:
    """Rows x columns of one scale block of a [out, in] weight: per channel = one row."""
    rows, cols = shape
    return (1, cols) if group_size in (None, "channel") else (1, int(group_size))


def quantize(w16: np.ndarray, scheme: str, group_size) -> tuple[np.ndarray, np.ndarray]:
    """int codes (int8 array) and fp16 scales [rows / br, cols / bc] of a 2-D fp16 weight."""
    if w16.dtype != np.float16 or w16.ndim != 2:
        raise ValueError(f"expected a 2-D float16 weight, got {w16.dtype} {w16.shape}")
    bits = BITS[scheme]
    qmax = 2 ** (bits - 1) - 1
    br, bc = block_shape(w16.shape, group_size)
    rows, cols = w16.shape
    blocks = w16.reshape(rows // br, br, cols // bc, bc)
    top = np.abs(blocks).max(axis=(1, 3), keepdims=True)
    scale = (top + top) / np.float16(2 * qmax)  # (max - (-max)) / (qmax - qmin), in fp16
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.clip(np.round(blocks / scale), -qmax, qmax)
    codes = np.nan_to_num(codes).astype(np.int8).reshape(rows, cols)  # an all-zero block: codes 0
    return codes, scale.reshape(rows // br, cols // bc)


def dequantize(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """fp16 weight as the program's dequantization op computes it (fp32 product, rounded to fp16)."""
    s = scale.astype(np.float32)
    for axis, (n, m) in enumerate(zip(codes.shape, s.shape)):
        s = np.repeat(s, n // m, axis=axis)
    return (codes.astype(np.float32) * s).astype(np.float16)


def effective_bits(scheme: str, shape: tuple[int, ...], group_size) -> float:
    br, bc = block_shape(shape, group_size)
    return BITS[scheme] + 16 / (br * bc)
