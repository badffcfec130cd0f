"""Host-side inputs of a static-shape decoder graph (NPU targets): M-RoPE cos/sin and the mask.

An NPU graph keeps no position math and no cache writes (``TextDecoderStatic``): the host computes
cos/sin from the 3-axis positions with the rotary table the manifest carries (``rope``: one
inverse frequency and one position axis per rotary pair), builds the additive mask over the C
cached slots followed by the T new ones, and writes the returned keys/values into its cache.
"""

from __future__ import annotations

import numpy as np

HTP_MASK = -255.0  # exp(-255) is 0 in fp32, and a 16-bit activation range keeps it


def rope_table(inv_freq, axis_selector) -> dict:
    """Manifest form of the decoder's rotary table: per frequency its value and position axis."""
    sel = np.asarray(axis_selector, dtype=np.float32).reshape(3, -1)
    return {"inv_freq": [float(v) for v in np.asarray(inv_freq, dtype=np.float32)],
            "axis": [int(a) for a in sel.argmax(axis=0)]}  # fmt: skip


def rotary_cos_sin(rope: dict, position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [1, 1, T, head_dim] (float32), as ``TextDecoder.rotary``: pairs share a frequency."""
    inv = np.asarray(rope["inv_freq"], dtype=np.float32)
    pos = np.asarray(position_ids, dtype=np.int64)[np.asarray(rope["axis"])]  # [hd/2, T]: each pair's own axis
    freqs = (pos.astype(np.float32) * inv[:, None]).T  # [T, hd/2]
    cos = np.repeat(np.cos(freqs), 2, axis=-1).astype(np.float32)
    sin = np.repeat(np.sin(freqs), 2, axis=-1).astype(np.float32)
    T = freqs.shape[0]
    return cos.reshape(1, 1, T, -1), sin.reshape(1, 1, T, -1)


def attention_mask(start: int, length: int, context: int) -> np.ndarray:
    """[1, 1, T, C + T]: cached slots before ``start`` and new tokens up to and including their own."""
    past = np.broadcast_to(np.arange(context) < start, (length, context))
    new = np.tril(np.ones((length, length), dtype=bool))
    return np.where(np.concatenate([past, new], axis=1), 0.0, HTP_MASK).astype(np.float32).reshape(1, 1, length, -1)
