"""Checkpoint keys and shapes of the optional audio tower (names as transformers' glmasr)."""

from __future__ import annotations

AUDIO_PREFIX = "model.audio_tower."
PROJECTOR_PREFIX = "model.multi_modal_projector."


def audio_layout(spec) -> dict[str, tuple[int, ...]]:
    a, d = spec.audio, spec.text.hidden_size
    h, kv = a.hidden_size, a.num_kv_heads * a.head_dim
    p = AUDIO_PREFIX
    out: dict[str, tuple[int, ...]] = {
        p + "conv1.weight": (h, a.num_mel_bins, 3),
        p + "conv1.bias": (h,),
        p + "conv2.weight": (h, h, 3),
        p + "conv2.bias": (h,),
    }
    for i in range(a.num_layers):
        b = f"{p}layers.{i}."
        out.update(
            {
                b + "self_attn.q_proj.weight": (a.num_heads * a.head_dim, h),
                b + "self_attn.q_proj.bias": (a.num_heads * a.head_dim,),
                b + "self_attn.k_proj.weight": (kv, h),
                b + "self_attn.v_proj.weight": (kv, h),
                b + "self_attn.v_proj.bias": (kv,),
                b + "self_attn.o_proj.weight": (h, a.num_heads * a.head_dim),
                b + "self_attn.o_proj.bias": (h,),
                b + "mlp.fc1.weight": (a.intermediate_size, h),
                b + "mlp.fc1.bias": (a.intermediate_size,),
                b + "mlp.fc2.weight": (h, a.intermediate_size),
                b + "mlp.fc2.bias": (h,),
                b + "input_layernorm.weight": (h,),
                b + "input_layernorm.bias": (h,),
                b + "post_attention_layernorm.weight": (h,),
                b + "post_attention_layernorm.bias": (h,),
            }
        )
    out[p + "norm.weight"] = (h,)
    out[p + "norm.bias"] = (h,)
    q = PROJECTOR_PREFIX
    out.update(
        {
            q + "linear_1.weight": (2 * d, a.intermediate_size),
            q + "linear_1.bias": (2 * d,),
            q + "linear_2.weight": (d, 2 * d),
            q + "linear_2.bias": (d,),
        }
    )
    return out
