"""Image preprocessing for a fixed-size vision encoder.

resize to SxS (bicubic, Pillow) -> RGB -> rescale (1/255) -> normalise (CLIP mean/std) ->
patchify into block-major order (each 2x2 merge window contiguous), one temporal frame.
Output: float32 [N, C*P*P], the exact input of the exported ``vision_encoder``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ExportError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePreprocessing:
    image_size: int
    patch_size: int = 14
    merge_size: int = 2
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    resample: str = "bicubic"

    @classmethod
    def from_checkpoint(cls, preprocessor_config: dict, image_size: int, patch_size: int, merge_size: int):
        pc = preprocessor_config or {}
        return cls(
            image_size=image_size,
            patch_size=int(pc.get("patch_size", patch_size)),
            merge_size=int(pc.get("merge_size", merge_size)),
            rescale_factor=float(pc.get("rescale_factor", 1 / 255)),
            image_mean=tuple(float(x) for x in pc.get("image_mean", CLIP_MEAN)),
            image_std=tuple(float(x) for x in pc.get("image_std", CLIP_STD)),
        )

    @classmethod
    def from_json(cls, data: dict) -> "ImagePreprocessing":
        """The inverse of ``to_json`` (a manifest's ``preprocessing`` section)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def merged_grid(self) -> tuple[int, int]:
        g = self.grid // self.merge_size
        return g, g

    @property
    def num_tokens(self) -> int:
        gh, gw = self.merged_grid
        return gh * gw

    def to_json(self) -> dict:
        return asdict(self)


def load_image(path: str | Path):
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise ExportError("image file not found", file=p, fix="pass an existing PNG or JPEG file with --image")
    try:
        with Image.open(p) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ExportError(f"cannot read image ({e.__class__.__name__})", file=p, fix="pass a valid PNG or JPEG file") from None


def patchify(chw: np.ndarray, patch: int, merge: int) -> np.ndarray:
    c, h, w = chw.shape
    gh, gw = h // patch, w // patch
    x = chw.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # block row, block col, row in block, col in block, C, py, px
    return np.ascontiguousarray(x.reshape(gh * gw, c * patch * patch))


def preprocess_image(image, cfg: ImagePreprocessing) -> np.ndarray:
    from PIL import Image

    img = image.convert("RGB")
    if img.size != (cfg.image_size, cfg.image_size):
        img = img.resize((cfg.image_size, cfg.image_size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) * np.float32(cfg.rescale_factor)
    mean = np.asarray(cfg.image_mean, np.float32)[:, None, None]
    std = np.asarray(cfg.image_std, np.float32)[:, None, None]
    arr = (arr - mean) / std
    return patchify(arr.astype(np.float32), cfg.patch_size, cfg.merge_size)
