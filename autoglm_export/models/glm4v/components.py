"""GLM-4.1V's components: the vision tower (one method per image bucket), the token embedding,
the decoder and, when the checkpoint has one, the GLM-ASR audio tower."""

from __future__ import annotations

from ...components import Component, ComponentRegistry
from . import layout
from .audio import AudioEncoder
from .audio_layout import audio_layout
from .text import TextDecoder, TokenEmbedding
from .vision import VisionEncoder

COMPONENTS = ComponentRegistry()

COMPONENTS.register(
    Component(
        name="vision_encoder",
        description="ViT + 2x2 merger: block-major patches of one image -> image token embeddings",
        applies=lambda spec: True,
        build=lambda spec, shapes: VisionEncoder(spec, shapes.buckets[0]),
        keys=layout.vision_layout,
    )
)
COMPONENTS.register(
    Component(
        name="token_embedding",
        description="token ids -> text embeddings",
        applies=lambda spec: True,
        build=lambda spec, shapes: TokenEmbedding(spec),
        keys=layout.embedding_layout,
    )
)
COMPONENTS.register(
    Component(
        name="text_decoder",
        description="GLM-4 decoder with static KV cache and 3-axis M-RoPE -> next-token logits",
        applies=lambda spec: True,
        build=lambda spec, shapes: TextDecoder(spec, shapes.max_context),
        keys=layout.decoder_layout,
    )
)
COMPONENTS.register(
    Component(
        name="audio_encoder",
        description="GLM-ASR audio tower + projector: log-mel window -> audio token embeddings",
        applies=lambda spec: spec.audio is not None,
        build=lambda spec, shapes: AudioEncoder(spec, shapes.audio_frames),
        keys=audio_layout,
    )
)
