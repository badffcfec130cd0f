"""Host-side inputs of a static-shape decoder graph (NPU targets): M-RoPE cos/sin and the mask.

An NPU graph keeps no position math and no cache writes (``TextDecoderStatic``): the host computes
cos/sin from the 3-axis positions with the rotary table the manifest carries (``rope``: one
inverse frequency and one position axis per rotary pair), builds the 0/1 visibility of the C
cached slots followed by the T new ones, and writes the returned keys/values into its cache.
"""

from __future__ import annotations

import numpy as np


def rope_table(inv_freq, axis_selector) -> dict:
    """Manifest form of the decoder's rotary table: per frequency its value and position axis."""
    sel = np.asarray(axis_selector, dtype=np.float32).reshape(3, -1)
    return {
        "inv_freq": [float(v) for v in np.asarray(inv_freq, dtype=np.float32)],
        "axis": [int(a) for a in sel.argmax(axis=0)],
    }


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
    """[1, 1, T, C + T] visibility (1 visible, 0 hidden): cached slots before ``start``, and new
    tokens up to and including their own. Multiplicative, not additive: an additive -inf-like mask
    widens the quantized range of the scores so much that the HTP's softmax loses the visible ones
    (measured: 2 dB against the PyTorch simulation on the tiny decoder)."""
    past = np.broadcast_to(np.arange(context) < start, (length, context))
    new = np.tril(np.ones((length, length), dtype=bool))
    return np.concatenate([past, new], axis=1).astype(np.float32).reshape(1, 1, length, -1)


MASK_FILL = -1.0e4  # finite: exp() of it is 0 in fp16 and fp32; -inf becomes a NaN constant in Core ML


def additive_mask(start: int, length: int, context: int) -> np.ndarray:
    """[1, 1, T, C] additive mask over all C cache slots (Core ML: the new tokens are written into
    the state first): 0 where slot <= start + i, ``MASK_FILL`` elsewhere."""
    visible = np.arange(context)[None, :] <= (start + np.arange(length))[:, None]
    return np.where(visible, 0.0, MASK_FILL).astype(np.float32).reshape(1, 1, length, context)
