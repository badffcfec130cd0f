"""Weight names and shapes of a GLM-4.1V checkpoint, derived from its config.

This is the contract a checkpoint must meet before any work starts: every key present with
exactly this shape. Keys are grouped by component so that each component can be streamed,
quantized and released on its own.
"""

from __future__ import annotations

import re

from .spec import ModelSpec

VISION_PREFIX = "model.visual."
TEXT_PREFIX = "model.language_model."

# Older GLM-4.1V exports (transformers < 4.53) stored the text model one level up.
LEGACY_KEY_ALIASES = ((re.compile(r"^model\.(layers\.|embed_tokens\.|norm\.)"), r"model.language_model.\1"),)


def canonical_key(key: str) -> str:
    for pattern, repl in LEGACY_KEY_ALIASES:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


def vision_layout(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    v = spec.vision
    h, o, m = v.hidden_size, v.out_hidden_size, v.spatial_merge_size
    p = VISION_PREFIX
    out: dict[str, tuple[int, ...]] = {
        p + "patch_embed.proj.weight": (h, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
        p + "patch_embed.proj.bias": (h,),
        p + "embeddings.position_embedding.weight": (v.position_grid**2, h),
        p + "post_conv_layernorm.weight": (h,),
    }
    for i in range(v.depth):
        b = f"{p}blocks.{i}."
        out[b + "norm1.weight"] = (h,)
        out[b + "norm2.weight"] = (h,)
        out[b + "attn.qkv.weight"] = (3 * h, h)
        if v.attention_bias:
            out[b + "attn.qkv.bias"] = (3 * h,)
        out[b + "attn.proj.weight"] = (h, h)
        out[b + "mlp.gate_proj.weight"] = (o, h)
        out[b + "mlp.up_proj.weight"] = (o, h)
        out[b + "mlp.down_proj.weight"] = (h, o)
    out.update(
        {
            p + "post_layernorm.weight": (h,),
            p + "downsample.weight": (o, h, m, m),
            p + "downsample.bias": (o,),
            p + "merger.proj.weight": (o, o),
            p + "merger.post_projection_norm.weight": (o,),
            p + "merger.post_projection_norm.bias": (o,),
            p + "merger.gate_proj.weight": (v.intermediate_size, o),
            p + "merger.up_proj.weight": (v.intermediate_size, o),
            p + "merger.down_proj.weight": (o, v.intermediate_size),
        }
    )
    return out


def embedding_layout(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    t = spec.text
    return {TEXT_PREFIX + "embed_tokens.weight": (t.vocab_size, t.hidden_size)}


def decoder_layer_layout(spec: ModelSpec, i: int) -> dict[str, tuple[int, ...]]:
    t = spec.text
    d, kv = t.hidden_size, t.num_kv_heads * t.head_dim
    b = f"{TEXT_PREFIX}layers.{i}."
    return {
        b + "self_attn.q_proj.weight": (d, d),
        b + "self_attn.q_proj.bias": (d,),
        b + "self_attn.k_proj.weight": (kv, d),
        b + "self_attn.k_proj.bias": (kv,),
        b + "self_attn.v_proj.weight": (kv, d),
        b + "self_attn.v_proj.bias": (kv,),
        b + "self_attn.o_proj.weight": (d, d),
        b + "mlp.gate_up_proj.weight": (2 * t.intermediate_size, d),
        b + "mlp.down_proj.weight": (d, t.intermediate_size),
        b + "input_layernorm.weight": (d,),
        b + "post_self_attn_layernorm.weight": (d,),
        b + "post_attention_layernorm.weight": (d,),
        b + "post_mlp_layernorm.weight": (d,),
    }


def decoder_layout(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    t = spec.text
    out: dict[str, tuple[int, ...]] = {}
    for i in range(t.num_layers):
        out.update(decoder_layer_layout(spec, i))
    out[TEXT_PREFIX + "norm.weight"] = (t.hidden_size,)
    if not t.tie_word_embeddings:
        out["lm_head.weight"] = (t.vocab_size, t.hidden_size)
    return out


def full_layout(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    out = {}
    out.update(vision_layout(spec))
    out.update(embedding_layout(spec))
    out.update(decoder_layout(spec))
    if spec.audio is not None:
        from .audio_layout import audio_layout

        out.update(audio_layout(spec))
    return out
