"""A conversation's pieces: messages of text, image and audio parts, and the rendered prompt
(token ids, the media in order, and the key of every token for prefix reuse)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .prompt import Prompt

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Part:
    kind: str  # "text" | "image" | "audio"
    text: str = ""
    data: np.ndarray | None = None  # preprocessed pixels or log-mel features
    digest: str = ""
    grid: tuple[int, int] | None = None  # an image's merged grid (its bucket's): grid[0] * grid[1] image tokens
    method: str = "vision_encoder"  # an image's vision method (its bucket's)

    def tokens(self, default: int | None) -> int | None:
        return self.grid[0] * self.grid[1] if self.kind == "image" and self.grid else default

    @classmethod
    def of_text(cls, text: str) -> "Part":
        return cls("text", text=text)


@dataclass(frozen=True)
class Message:
    role: str
    parts: tuple[Part, ...]

    @classmethod
    def text(cls, role: str, text: str) -> "Message":
        return cls(role, (Part.of_text(text),))


@dataclass
class Rendered:
    prompt: Prompt
    keys: list[tuple[int, str]]  # per token: (id, digest of the image/clip it stands for, or "")
    images: list[np.ndarray] = field(default_factory=list)
    audios: list[np.ndarray] = field(default_factory=list)
    image_parts: list[Part] = field(default_factory=list)

    def add_media(self, part: Part) -> None:
        (self.images if part.kind == "image" else self.audios).append(part.data)
        if part.kind == "image":
            self.image_parts.append(part)

    def image_inputs(self, default_grid: tuple[int, int]) -> dict:
        """``generate``'s image arguments: each image's grid and vision method."""
        return {
            "images": self.images,
            "image_grids": [p.grid or default_grid for p in self.image_parts],
            "image_methods": [p.method for p in self.image_parts],
        }


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:32]
