"""Optional audio tower of a GLM-4.1V checkpoint (GLM-ASR style, transformers' ``glmasr``).

The published AutoGLM-Phone-9B has no audio weights. A checkpoint whose config.json carries an
``audio_config`` (the ``GlmAsrEncoderConfig`` fields) plus ``audio_token_id``,
``audio_start_token_id`` and ``audio_end_token_id`` gets an ``audio_encoder`` component:
Whisper-style 128-bin log-mel -> conv k3 -> GELU -> conv k3 stride 2 -> GELU -> pre-norm encoder
layers with partial NeoX RoPE -> LayerNorm -> 4-frame merge -> Linear-GELU-Linear projector into
the text width. Weights live under ``model.audio_tower.`` and ``model.multi_modal_projector.``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import CheckpointError
from .config_fields import ConfigFields

MERGE = 4  # encoder frames merged into one LM token (GlmAsr's reshape to intermediate_size)


@dataclass(frozen=True)
class AudioSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_mel_bins: int
    max_position_embeddings: int
    rope_theta: float
    partial_rotary_factor: float
    audio_token_id: int
    audio_start_token_id: int
    audio_end_token_id: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


def parse_audio_config(config: dict, file: Path, text) -> AudioSpec | None:
    raw = config.get("audio_config")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise CheckpointError(
            "invalid config section",
            file=file,
            field="audio_config",
            expected="an object",
            got=type(raw).__name__,
            fix="use the GlmAsrEncoderConfig fields",
        )
    a = ConfigFields(raw, file, "audio_config.")
    top = ConfigFields(config, file, "")
    for key, want in (("hidden_act", "gelu"), ("projector_hidden_act", "gelu")):
        src = raw if key == "hidden_act" else config
        if src.get(key, want) != want:
            raise CheckpointError(
                "unsupported audio activation",
                file=file,
                field=key,
                expected=repr(want),
                got=repr(src.get(key)),
                fix="only GELU audio towers are supported",
            )
    rope = raw.get("rope_parameters") or {}
    heads = a.int("num_attention_heads")
    spec = AudioSpec(
        hidden_size=a.int("hidden_size"),
        intermediate_size=a.int("intermediate_size"),
        num_layers=a.int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=a.int("num_key_value_heads", heads),
        num_mel_bins=a.int("num_mel_bins", 128),
        max_position_embeddings=a.int("max_position_embeddings", 1500),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5))),
        audio_token_id=top.int("audio_token_id", minimum=0),
        audio_start_token_id=top.int("audio_start_token_id", minimum=0),
        audio_end_token_id=top.int("audio_end_token_id", minimum=0),
    )
    if spec.intermediate_size != MERGE * spec.hidden_size:
        raise a._err(
            "intermediate_size",
            f"{MERGE} x hidden_size = {MERGE * spec.hidden_size} (4-frame merge)",
            spec.intermediate_size,
        )
    if spec.hidden_size % heads or heads % spec.num_kv_heads or spec.rotary_dim % 2:
        raise a._err(
            "num_attention_heads", "hidden_size divisible by heads, heads by KV heads, even rotary width", heads
        )
    for name in ("audio_token_id", "audio_start_token_id", "audio_end_token_id"):
        if getattr(spec, name) >= text.vocab_size:
            raise top._err(name, f"an id below vocab_size {text.vocab_size}", getattr(spec, name))
    return spec
