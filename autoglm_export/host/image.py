"""Image preprocessing for the vision encoder's fixed-size buckets.

A recipe lists one or more image sizes (``shapes.images``, (height, width) in pixels); each is
its own vision method. An image goes to the bucket closest to it in aspect ratio and is resized
into it (bicubic, Pillow, as transformers' ``Glm4vImageProcessor`` resizes to its smart-resize
size) -> RGB -> rescale (1/255) -> normalise (CLIP mean/std) -> patchify into block-major order
(each 2x2 merge window contiguous), one temporal frame.
Output: float32 [N, C*P*P], the exact input of the bucket's vision method.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ExportError, excerpt
from ..methods import vision_method

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _sizes(sizes) -> tuple[tuple[int, int], ...]:
    """``336`` (one square bucket) or ``[(h, w), ...]`` as a tuple of (height, width) pairs."""
    if isinstance(sizes, int):
        return ((sizes, sizes),)
    return tuple((int(h), int(w)) for h, w in sizes)


@dataclass(frozen=True)
class ImageInput:
    """One image ready for its bucket's vision method."""

    pixels: np.ndarray  # [N, C*P*P] float32
    method: str  # the vision method that encodes it
    size: tuple[int, int]  # (height, width) it was resized to
    grid: tuple[int, int]  # merged (rows, cols): its image tokens, and its M-RoPE layout

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class ImagePreprocessing:
    sizes: tuple[tuple[int, int], ...]  # the buckets, (height, width) in pixels; the first is ``vision_encoder``
    patch_size: int = 14
    merge_size: int = 2
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", _sizes(self.sizes))

    @classmethod
    def from_checkpoint(
        cls,
        preprocessor_config: dict,
        sizes,
        patch_size: int,
        merge_size: int,
        file: str | Path = "preprocessor_config.json",
    ):
        """``sizes``: the recipe's image buckets (or one square side)."""
        pc = preprocessor_config if isinstance(preprocessor_config, dict) else {}

        def bad(field: str, expected: str) -> ExportError:
            return ExportError(
                "invalid image preprocessing setting",
                file=file,
                field=field,
                expected=expected,
                got=excerpt(repr(pc.get(field))),
                fix="copy preprocessor_config.json from the original checkpoint",
            )

        def integer(field: str, model_value: int) -> int:
            v = pc.get(field, model_value)
            if isinstance(v, bool) or not isinstance(v, int) or v != model_value:
                raise bad(field, f"the integer {model_value} (the vision tower's config.json)")
            return v

        def triple(field: str, default, positive: bool) -> tuple[float, float, float]:
            v = pc.get(field, default)
            if not (
                isinstance(v, (list, tuple))
                and len(v) == 3
                and all(_finite_number(x) for x in v)
                and (not positive or all(x > 0 for x in v))
            ):
                raise bad(field, f"three finite {'positive ' if positive else ''}numbers (one per RGB channel)")
            return tuple(float(x) for x in v)

        rescale = pc.get("rescale_factor", 1 / 255)
        if not _finite_number(rescale) or rescale <= 0:
            raise bad("rescale_factor", "a finite positive number such as 1/255")
        return cls(
            sizes=_sizes(sizes),
            patch_size=integer("patch_size", patch_size),
            merge_size=integer("merge_size", merge_size),
            rescale_factor=float(rescale),
            image_mean=triple("image_mean", CLIP_MEAN, False),
            image_std=triple("image_std", CLIP_STD, True),
        )

    @classmethod
    def from_json(cls, data: dict) -> "ImagePreprocessing":
        """The inverse of ``to_json`` (a manifest's ``preprocessing`` section)."""
        data = dict(data)
        buckets = data.pop("buckets")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(sizes=tuple((b["height"], b["width"]) for b in buckets), **fields)

    def to_json(self) -> dict:
        out = asdict(self)
        del out["sizes"]
        out["buckets"] = [
            {
                "height": h,
                "width": w,
                "method": self.method(i),
                "tokens": self.num_tokens_of(i),
                "grid": list(self.merged_grid_of(i)),
            }
            for i, (h, w) in enumerate(self.sizes)
        ]
        return out

    # -- buckets ----------------------------------------------------------------------------
    def method(self, index: int) -> str:
        return vision_method(index, self.sizes[index])

    def merged_grid_of(self, index: int) -> tuple[int, int]:
        h, w = self.sizes[index]
        f = self.patch_size * self.merge_size
        return h // f, w // f

    def num_tokens_of(self, index: int) -> int:
        gh, gw = self.merged_grid_of(index)
        return gh * gw

    def choose(self, width: int, height: int) -> int:
        """The bucket closest to a ``width`` x ``height`` image in aspect ratio (log scale: 2:1 and
        1:2 are equally far from 1:1); the first such bucket on a tie."""
        ratio = math.log(max(width, 1) / max(height, 1))
        return min(range(len(self.sizes)), key=lambda i: abs(ratio - math.log(self.sizes[i][1] / self.sizes[i][0])))

    def prepare(self, image) -> ImageInput:
        """A PIL image as the input of its bucket's method."""
        i = self.choose(*image.size)
        return ImageInput(
            preprocess_image(image, self, self.sizes[i]), self.method(i), self.sizes[i], self.merged_grid_of(i)
        )

    # the first bucket (``vision_encoder``): what single-image callers without a choice use
    @property
    def merged_grid(self) -> tuple[int, int]:
        return self.merged_grid_of(0)

    @property
    def num_tokens(self) -> int:
        return self.num_tokens_of(0)


# Pillow refuses images over ~179 M pixels (DecompressionBombError) only after a warning band; a
# phone screenshot is ~3 M. Anything past this is refused before its pixels are decoded.
MAX_IMAGE_PIXELS = 50_000_000


def to_rgb(img):
    """RGB as transformers' image processors see it (``convert_to_rgb``): transparency composited on
    white, not dropped (``convert("RGB")`` alone turns transparent pixels into their hidden colour)."""
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path):
    """An image file as the model should see it: EXIF orientation applied (transformers' ``load_image``
    does ``ImageOps.exif_transpose``; a phone JPEG is often stored sideways), transparency on white."""
    p = Path(path)
    if not p.is_file():
        raise ExportError("image file not found", file=p, fix="pass an existing PNG or JPEG file with --image")
    with open(p, "rb") as f:
        return decode_image(f, file=p)


def decode_image(source, *, file=None, field: str | None = None):
    """``load_image`` of an open binary file or bytes (a request's data URL); errors name ``file``/``field``."""
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ExportError(
                    "image too large",
                    file=file,
                    field=field,
                    expected=f"at most {MAX_IMAGE_PIXELS:,} pixels",
                    got=f"{w} x {h}",
                    fix="downscale the image (a phone screenshot is ~3 M pixels)",
                )
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError, SyntaxError) as e:
        raise ExportError(
            f"cannot read image ({e.__class__.__name__})", file=file, field=field, fix="pass a valid PNG or JPEG file"
        ) from None


def patchify(chw: np.ndarray, patch: int, merge: int) -> np.ndarray:
    c, h, w = chw.shape
    gh, gw = h // patch, w // patch
    x = chw.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # block row, block col, row in block, col in block, C, py, px
    return np.ascontiguousarray(x.reshape(gh * gw, c * patch * patch))


def preprocess_image(image, cfg: ImagePreprocessing, size: tuple[int, int] | None = None) -> np.ndarray:
    """Pixels of ``image`` resized to ``size`` ((height, width); default: the bucket ``cfg.choose``s)."""
    from PIL import Image

    img = to_rgb(image)
    h, w = size or cfg.sizes[cfg.choose(*img.size)]
    if img.size != (w, h):
        img = img.resize((w, h), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) * np.float32(cfg.rescale_factor)
    mean = np.asarray(cfg.image_mean, np.float32)[:, None, None]
    std = np.asarray(cfg.image_std, np.float32)[:, None, None]
    arr = (arr - mean) / std
    return patchify(arr.astype(np.float32), cfg.patch_size, cfg.merge_size)
