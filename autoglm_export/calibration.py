"""Calibration inputs named by a recipe: phone screenshots and agent prompts shipped as small
files (``recipes/calibration/``), for the NPU targets whose activation ranges come from data.

A recipe lists them relative to its own directory::

    calibration:
      images: [calibration/settings.png, calibration/chat.png]
      prompts: calibration/prompts.txt      # one prompt per line

Each prompt becomes a chat turn with one image (images are paired round-robin), tokenized with the
checkpoint's tokenizer and given M-RoPE positions exactly as ``run`` does. The NPU targets add
their own seeded random inputs to these (``targets/shared/static_graphs.py``). The manifest records each
file's SHA-256; ``verify`` refuses files that changed since the export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ExportError
from .fsutil import sha256_file


@dataclass
class CalibrationSet:
    pixel_values: list[np.ndarray] = field(default_factory=list)  # one patchified image each, first bucket's size
    prompts: list = field(default_factory=list)  # host.prompt.Prompt, one image run each
    positions: list[np.ndarray] = field(default_factory=list)  # M-RoPE [3, T] per prompt
    files: dict[str, str] = field(default_factory=dict)  # path as the recipe names it -> sha256
    images: list = field(default_factory=list)  # the PIL images, for the other buckets' sizes
    pre: object = None  # host.image.ImagePreprocessing

    def pixels_at(self, size: tuple[int, int]) -> list[np.ndarray]:
        """The calibration images resized to another image bucket's (height, width)."""
        from .host.image import preprocess_image

        return [preprocess_image(img, self.pre, tuple(size)) for img in self.images]

    def to_json(self) -> dict:
        return {"images": len(self.pixel_values), "prompts": len(self.prompts), "files": self.files}


def load_calibration(spec, base: Path, recipe_file: str, tokenizer, pre) -> CalibrationSet:
    from .host.image import load_image, preprocess_image
    from .host.positions import mrope_positions
    from .host.conversation import build_chat_prompt

    out = CalibrationSet(pre=pre)
    if spec is None or (not spec.images and spec.prompts is None):
        return out
    for i, name in enumerate(spec.images):
        path = _resolve(base, name, f"calibration.images[{i}]", recipe_file)
        out.files[name] = sha256_file(path)
        img = load_image(path)
        out.images.append(img)
        out.pixel_values.append(preprocess_image(img, pre, pre.sizes[0]))
    if spec.prompts is not None:
        path = _resolve(base, spec.prompts, "calibration.prompts", recipe_file)
        out.files[spec.prompts] = sha256_file(path)
        lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
        if not lines:
            raise ExportError(
                "no prompts in the calibration file",
                file=path,
                field="calibration.prompts",
                fix="write one prompt per line",
            )
        if not out.pixel_values:
            raise ExportError(
                "calibration prompts need at least one image",
                file=recipe_file,
                field="calibration.images",
                fix="list one or more screenshots under calibration.images",
            )
        for text in lines:
            p = build_chat_prompt(tokenizer, text, image_tokens=pre.num_tokens)
            out.prompts.append(p)
            out.positions.append(mrope_positions(p.types, [pre.merged_grid])[0])
    return out


def check_unchanged(recorded: dict, current: CalibrationSet, manifest_file) -> None:
    for name, digest in recorded.items():
        if current.files.get(name) != digest:
            raise ExportError(
                "a calibration file differs from the one this bundle was calibrated with",
                file=manifest_file,
                field=f"calibration.files[{name!r}]",
                fix="restore the file, or re-export the bundle",
            )


def _resolve(base: Path, name: str, field_name: str, recipe_file: str) -> Path:
    path = (base / name).resolve()
    if not path.is_file():
        raise ExportError(
            "calibration file not found",
            file=recipe_file,
            field=field_name,
            got=str(path),
            expected="a file relative to the recipe's directory",
            fix="fix the path or drop the entry",
        )
    return path
