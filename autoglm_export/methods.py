"""Method names of a bundle: the runner contract the apps call (docs/bundle-format.md), the same
for every model family and target."""

from __future__ import annotations

import re

VISION_METHOD = "vision_encoder"


def vision_method(index: int, size: tuple[int, int]) -> str:
    """The method of image bucket ``index`` (``size`` = (height, width) in pixels): the first bucket
    keeps the runner contract's ``vision_encoder``; each further one is ``vision_encoder_<h>x<w>``."""
    return VISION_METHOD if index == 0 else f"{VISION_METHOD}_{size[0]}x{size[1]}"


def is_vision_method(name: str) -> bool:
    return name == VISION_METHOD or bool(re.fullmatch(VISION_METHOD + r"_\d+x\d+", name))
