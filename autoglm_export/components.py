"""Components: the per-modality subgraphs an export produces, and the static shapes they take.

Each component names its runtime method (the apps' runner contract: docs/bundle-format.md), whether a given
checkpoint has it, how to build its export-ready module on the meta device and which
checkpoint tensors it reads. Each model family fills one registry (``models/<family>/components.py``);
optional towers (audio) register there without touching the others; an unknown name lists the
valid ones. The vision tower is one component per image bucket of the recipe (``shapes.images``):
the same weights, one static size each.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch.nn as nn

from .errors import ExportError
from .methods import VISION_METHOD, is_vision_method, vision_method


@dataclass(frozen=True)
class Shapes:
    """Static shapes every target compiles for (from the recipe)."""

    image_size: int = 336  # a single square bucket, when ``images`` is empty
    max_context: int = 2048
    prefill_chunk: int = 128
    audio_seconds: float = 3.2  # fixed audio window; 100 log-mel frames per second
    images: tuple[tuple[int, int], ...] = ()  # image buckets (height, width) in pixels, in recipe order

    @classmethod
    def from_recipe(cls, recipe) -> "Shapes":
        s = recipe.shapes
        return cls(
            max_context=s.max_context, prefill_chunk=s.prefill_chunk, audio_seconds=s.audio_seconds, images=s.buckets
        )

    @property
    def buckets(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(b) for b in self.images) or ((self.image_size, self.image_size),)

    def bucket_methods(self) -> dict[str, tuple[int, int]]:
        """Vision method name -> (height, width), the first bucket's method being ``vision_encoder``."""
        return {vision_method(i, b): b for i, b in enumerate(self.buckets)}

    @property
    def audio_frames(self) -> int:
        return round(self.audio_seconds * 100)


@dataclass(frozen=True)
class Component:
    name: str
    description: str
    applies: Callable[[Any], bool]
    build: Callable[[Any, Shapes], nn.Module]
    keys: Callable[[Any], dict]  # checkpoint key -> shape
    tower: str = ""  # the name quantization rules match (``<tower>.<weight>``); the name itself if empty

    @property
    def rule_name(self) -> str:
        return self.tower or self.name


class ComponentRegistry:
    def __init__(self) -> None:
        self._items: dict[str, Component] = {}

    def register(self, comp: Component) -> Component:
        self._items[comp.name] = comp
        return comp

    def get(self, name: str) -> Component:
        if name not in self._items and is_vision_method(name):
            h, w = map(int, name.removeprefix(VISION_METHOD + "_").split("x"))
            return _bucket(self._items[VISION_METHOD], name, (h, w))
        if name not in self._items:
            raise ExportError(
                "unknown component", field=name, expected=" | ".join(self._items), fix="use one of the listed names"
            )
        return self._items[name]

    def for_spec(self, spec, shapes: Shapes | None = None) -> list[Component]:
        """The components of a model; with ``shapes``, one vision component per image bucket."""
        out = []
        for c in self._items.values():
            if not c.applies(spec):
                continue
            if c.name == VISION_METHOD and shapes is not None:
                out += [_bucket(c, name, size) for name, size in shapes.bucket_methods().items()]
            else:
                out.append(c)
        return out


def _bucket(vision: Component, name: str, size: tuple[int, int]) -> Component:
    return replace(
        vision,
        name=name,
        tower=VISION_METHOD,
        build=lambda spec, shapes: vision.build(spec, replace(shapes, images=(size,))),
        description=f"{vision.description} ({size[0]}x{size[1]} pixels)",
    )
