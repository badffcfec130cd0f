"""GLM-4.1V configuration: read config.json in its nested or legacy flat form.

transformers 5.23 silently drops ``partial_rotary_factor`` and ``mrope_section`` from a flat
config (and falls back to default widths), so we never hand config.json to transformers: we
read every field ourselves and reject what we cannot honour.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ...errors import CheckpointError
from .config_fields import ConfigFields

FAMILY_NAME = "glm4v"  # the package under models/ (models.MODEL_TYPES)
ARCHITECTURE = "Glm4vForConditionalGeneration"
MODEL_TYPES = ("glm4v",)

# Real special token ids of GLM-4.1V (its released tokenizer.json); tiny checkpoints remap them.
SPECIAL_TOKEN_NAMES = {
    "pad": "<|endoftext|>",
    "gmask": "[gMASK]",
    "sop": "<sop>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "observation": "<|observation|>",
    "begin_of_image": "<|begin_of_image|>",
    "end_of_image": "<|end_of_image|>",
    "image": "<|image|>",
    "video": "<|video|>",
}


@dataclass(frozen=True)
class TextSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    mrope_section: tuple[int, ...]
    max_position_embeddings: int
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass(frozen=True)
class VisionSpec:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    image_size: int
    in_channels: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TokenSpec:
    image_token_id: int
    image_start_token_id: int
    image_end_token_id: int
    video_token_id: int
    pad_token_id: int | None
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    family: ClassVar[str] = FAMILY_NAME  # how models.family_of finds the family of this spec
    architecture: str
    model_type: str
    config_form: str  # "nested" or "flat"
    text: TextSpec
    vision: VisionSpec
    tokens: TokenSpec
    audio: Any = None  # AudioSpec when the checkpoint carries an audio tower
    extra: dict = field(default_factory=dict, compare=False)

    def to_json(self) -> dict:
        return asdict(self)


def _rope_fields(text: dict, top: dict) -> dict:
    """Collect RoPE settings from wherever a GLM-4.1V config keeps them.

    Nested configs carry ``text_config.rope_parameters``; legacy flat configs use
    ``rope_scaling`` plus top-level ``rope_theta`` / ``partial_rotary_factor``.
    """
    merged: dict = {}
    for source in (top, text):
        for key in ("rope_theta", "partial_rotary_factor", "mrope_section"):
            if source.get(key) is not None:
                merged[key] = source[key]
        for block in ("rope_scaling", "rope_parameters"):
            params = source.get(block)
            if isinstance(params, dict):
                for key in ("rope_theta", "partial_rotary_factor", "mrope_section"):
                    if params.get(key) is not None:
                        merged[key] = params[key]
    return merged


def parse_config(config: dict, file: Path, generation_config: dict | None = None) -> ModelSpec:
    """Build a ``ModelSpec`` from a parsed config.json (nested or flat form) that
    ``models.family_for_config`` gave to this family."""
    top = ConfigFields(config, file, "")
    model_type = config.get("model_type")

    nested = isinstance(config.get("text_config"), dict)
    text_raw = config["text_config"] if nested else config
    t = ConfigFields(text_raw, file, "text_config." if nested else "")
    rope = _rope_fields(text_raw, config)
    rf = ConfigFields(rope, file, "text_config.rope_parameters." if nested else "rope_scaling.")

    hidden = t.int("hidden_size")
    heads = t.int("num_attention_heads")
    kv_heads = t.int("num_key_value_heads", heads)
    if hidden % heads or heads % kv_heads:
        raise t._err(
            "num_attention_heads", "hidden_size divisible by heads, heads by KV heads", (hidden, heads, kv_heads)
        )
    if t.str("hidden_act", "silu") != "silu":
        raise t._err("hidden_act", "'silu'", text_raw.get("hidden_act"))
    if "partial_rotary_factor" not in rope or "mrope_section" not in rope:
        raise CheckpointError(
            "missing RoPE field",
            file=file,
            field=(t.prefix + "rope_parameters") if nested else "rope_scaling / partial_rotary_factor",
            expected="partial_rotary_factor and mrope_section (GLM-4.1V uses 0.5 and [8, 12, 12])",
            fix="add them to config.json; without them the rotary width cannot be known",
        )
    prf = rf.float("partial_rotary_factor")
    section = rope["mrope_section"]
    head_dim = hidden // heads
    if (
        not isinstance(section, list)
        or len(section) != 3
        or not all(isinstance(s, int) and s > 0 for s in section)
        or sum(section) * 2 != int(head_dim * prf)
    ):
        raise rf._err(
            "mrope_section",
            f"three positive integers summing to rotary_dim/2 = {int(head_dim * prf) // 2}",
            section,
        )
    text = TextSpec(
        hidden_size=hidden,
        num_layers=t.int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=t.int("intermediate_size"),
        vocab_size=t.int("vocab_size"),
        rms_norm_eps=t.float("rms_norm_eps", 1e-5),
        rope_theta=rf.float("rope_theta", 10000.0),
        partial_rotary_factor=prf,
        mrope_section=tuple(section),
        max_position_embeddings=t.int("max_position_embeddings", 32768),
        tie_word_embeddings=top.bool("tie_word_embeddings", False) or t.bool("tie_word_embeddings", False),
    )

    vraw = config.get("vision_config")
    if not isinstance(vraw, dict):
        raise CheckpointError(
            "missing config section",
            file=file,
            field="vision_config",
            expected="an object describing the vision tower",
            fix="use the checkpoint's original config.json",
        )
    v = ConfigFields(vraw, file, "vision_config.")
    vrope = vraw.get("rope_parameters") or {}
    if v.str("hidden_act", "silu") != "silu":
        raise v._err("hidden_act", "'silu'", vraw.get("hidden_act"))
    for key in ("image_size", "patch_size", "temporal_patch_size"):
        if isinstance(vraw.get(key), list):
            raise v._err(key, "a single integer", vraw[key])
    vision = VisionSpec(
        depth=v.int("depth"),
        hidden_size=v.int("hidden_size"),
        num_heads=v.int("num_heads"),
        intermediate_size=v.int("intermediate_size"),
        out_hidden_size=v.int("out_hidden_size"),
        patch_size=v.int("patch_size", 14),
        temporal_patch_size=v.int("temporal_patch_size", 2),
        spatial_merge_size=v.int("spatial_merge_size", 2),
        image_size=v.int("image_size", 336),
        in_channels=v.int("in_channels", 3),
        rms_norm_eps=v.float("rms_norm_eps", 1e-5),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
        attention_bias=v.bool("attention_bias", False),
    )
    if vision.out_hidden_size != text.hidden_size:
        raise v._err("out_hidden_size", f"the text hidden_size {text.hidden_size}", vision.out_hidden_size)
    if vision.hidden_size % vision.num_heads or vision.head_dim % 4:
        raise v._err("num_heads", "hidden_size/num_heads divisible by 4 (2-D rotary)", vision.num_heads)
    if vision.image_size % vision.patch_size:
        raise v._err("image_size", f"a multiple of patch_size {vision.patch_size}", vision.image_size)

    gen = generation_config or {}
    eos = gen.get("eos_token_id", config.get("eos_token_id", text_raw.get("eos_token_id")))
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
    pad = gen.get("pad_token_id", config.get("pad_token_id", text_raw.get("pad_token_id")))
    tokens = TokenSpec(
        image_token_id=top.int("image_token_id", 151343, minimum=0),
        image_start_token_id=top.int("image_start_token_id", 151339, minimum=0),
        image_end_token_id=top.int("image_end_token_id", 151340, minimum=0),
        video_token_id=top.int("video_token_id", 151344, minimum=0),
        pad_token_id=pad if isinstance(pad, int) else None,
        eos_token_ids=eos_ids,
    )
    for name in ("image_token_id", "image_start_token_id", "image_end_token_id"):
        if getattr(tokens, name) >= text.vocab_size:
            raise top._err(name, f"an id below vocab_size {text.vocab_size}", getattr(tokens, name))
    if not eos_ids:
        raise CheckpointError(
            "no end-of-sequence ids",
            file=file.parent / "generation_config.json",
            field="eos_token_id",
            expected="an id or a list of ids",
            fix="copy generation_config.json from the original checkpoint",
        )

    from .audio_spec import parse_audio_config  # audio is optional; see audio_spec.py

    audio = parse_audio_config(config, file, text)
    return ModelSpec(
        architecture=ARCHITECTURE,
        model_type=model_type or "glm4v",
        config_form="nested" if nested else "flat",
        text=text,
        vision=vision,
        tokens=tokens,
        audio=audio,
    )
