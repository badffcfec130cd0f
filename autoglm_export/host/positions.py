"""3-axis M-RoPE position ids (transformers' ``Glm4vModel.get_rope_index``).

Text tokens get the same position on all three axes. An image whose merged grid is gh x gw
and which starts at position ``cur`` gets t = cur, h = cur + row, w = cur + col; the next
token then starts at ``cur + max(gh, gw)``. Because an image occupies fewer positions than
tokens, decode positions are ``cache_index + delta`` with ``delta = max(pos) + 1 - len``.
Audio tokens advance like text.
"""

from __future__ import annotations

from itertools import groupby

import numpy as np

from .prompt import AUDIO, IMAGE, TEXT


def mrope_positions(types: list[int], image_grids: list[tuple[int, int]]) -> tuple[np.ndarray, int]:
    """Positions [3, T] (int64) for a prompt and the delta that carries into decode.

    ``image_grids`` holds the merged (gh, gw) grid of each image, in prompt order.
    """
    grids = iter(image_grids)
    cols: list[np.ndarray] = []
    cur = 0
    for kind, run in groupby(types):
        n = len(list(run))
        if kind == IMAGE:
            gh, gw = next(grids)
            if gh * gw != n:
                raise ValueError(f"image run of {n} tokens does not match its grid {gh}x{gw}")
            rows, cols_ = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
            block = np.stack([np.full(n, cur), cur + rows.ravel(), cur + cols_.ravel()])
            cur += max(gh, gw)
        elif kind in (TEXT, AUDIO):  # audio tokens advance like text on all three axes
            block = np.tile(np.arange(cur, cur + n), (3, 1))
            cur += n
        else:
            raise ValueError(f"unknown token modality {kind}")
        cols.append(block)
    pos = np.concatenate(cols, axis=1).astype(np.int64) if cols else np.zeros((3, 0), np.int64)
    delta = int(pos.max()) + 1 - len(types) if len(types) else 0
    return pos, delta


def decode_positions(cache_index: int, delta: int) -> np.ndarray:
    """Position [3, 1] of the token written at ``cache_index`` after the prompt."""
    return np.full((3, 1), cache_index + delta, dtype=np.int64)
