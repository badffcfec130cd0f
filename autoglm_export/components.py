"""Component registry: the per-modality subgraphs an export produces.

Each component names its ExecuTorch method (runner contract, DESIGN.md §2), whether a given
checkpoint has it, how to build its export-ready module on the meta device and which
checkpoint tensors it reads. Optional towers (audio) register here without touching the
others; an unknown name lists the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from .errors import ExportError
from .models.glm4v import layout
from .models.glm4v.audio_layout import audio_layout
from .models.glm4v.modules import AudioEncoder, TextDecoder, TokenEmbedding, VisionEncoder
from .models.glm4v.spec import ModelSpec


@dataclass(frozen=True)
class Shapes:
    """Static shapes every target compiles for (from the recipe)."""

    image_size: int = 336
    max_context: int = 2048
    prefill_chunk: int = 128
    audio_seconds: float = 3.2  # fixed audio window; 100 log-mel frames per second

    @classmethod
    def from_recipe(cls, recipe) -> "Shapes":
        return cls(**recipe.shapes.model_dump())

    @property
    def audio_frames(self) -> int:
        return round(self.audio_seconds * 100)


@dataclass(frozen=True)
class Component:
    name: str
    description: str
    applies: Callable[[ModelSpec], bool]
    build: Callable[[ModelSpec, Shapes], nn.Module]
    keys: Callable[[ModelSpec], dict]  # checkpoint key -> shape


class ComponentRegistry:
    def __init__(self) -> None:
        self._items: dict[str, Component] = {}

    def register(self, comp: Component) -> Component:
        self._items[comp.name] = comp
        return comp

    def get(self, name: str) -> Component:
        if name not in self._items:
            raise ExportError(
                "unknown component", field=name, expected=" | ".join(self._items), fix="use one of the listed names"
            )
        return self._items[name]

    def for_spec(self, spec: ModelSpec) -> list[Component]:
        return [c for c in self._items.values() if c.applies(spec)]


registry = ComponentRegistry()

registry.register(
    Component(
        name="vision_encoder",
        description="ViT + 2x2 merger: block-major patches of one image -> image token embeddings",
        applies=lambda spec: True,
        build=lambda spec, shapes: VisionEncoder(spec, shapes.image_size),
        keys=layout.vision_layout,
    )
)
registry.register(
    Component(
        name="token_embedding",
        description="token ids -> text embeddings",
        applies=lambda spec: True,
        build=lambda spec, shapes: TokenEmbedding(spec),
        keys=layout.embedding_layout,
    )
)
registry.register(
    Component(
        name="text_decoder",
        description="GLM-4 decoder with static KV cache and 3-axis M-RoPE -> next-token logits",
        applies=lambda spec: True,
        build=lambda spec, shapes: TextDecoder(spec, shapes.max_context),
        keys=layout.decoder_layout,
    )
)
registry.register(
    Component(
        name="audio_encoder",
        description="GLM-ASR audio tower + projector: log-mel window -> audio token embeddings",
        applies=lambda spec: spec.audio is not None,
        build=lambda spec, shapes: AudioEncoder(spec, shapes.audio_frames),
        keys=audio_layout,
    )
)
