"""The text decoder in the forms other targets export, all computing what ``text.TextDecoder``
computes: the cache as explicit inputs/outputs (onnx), host-side cos/sin, mask and cache with
static graphs (qnn, onnx-qnn), the cache as Core ML state (coreml)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import group_mask, grouped_attention, rotary_qkv
from .spec import FAMILY_NAME
from .text import TextDecoder


class TextDecoderExplicitCache(nn.Module):
    """The same decoder with the KV cache as inputs and outputs (ONNX Runtime has no module state):
    (inputs_embeds, position_ids, cache_position, k_0, v_0, ...) -> (logits, k_0', v_0', ...)."""

    family = FAMILY_NAME  # read by models.family_of

    method_name = "text_decoder"

    def __init__(self, decoder: TextDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def cache_shape(self) -> tuple[int, ...]:
        t = self.decoder.t
        return (1, t.num_kv_heads, self.decoder.max_context, t.head_dim)

    def empty_caches(self) -> list[torch.Tensor]:
        return [torch.zeros(self.cache_shape()) for _ in range(2 * len(self.decoder.layer_ids))]

    def cache_names(self) -> list[str]:
        return [f"{kind}_cache_{i}" for i in self.decoder.layer_ids for kind in ("k", "v")]

    def forward(self, inputs_embeds, position_ids, cache_position, caches: list[torch.Tensor]):
        return self.decoder.run(inputs_embeds, position_ids, cache_position, caches)


class TextDecoderStatic(nn.Module):
    """The decoder for static-shape NPU graphs (QNN HTP): no cache writes and no position math in
    the graph. The host computes the M-RoPE cos/sin and the additive mask, holds the KV cache, and
    writes the returned new keys/values at their slots after each call. Keys are the C cached slots
    followed by the T new ones, so the mask is [1, 1, T, C + T].

    (inputs_embeds [1,T,D], cos [1,1,T,hd], sin [1,1,T,hd], mask [1,1,T,C+T], k_0, v_0, ...)
        -> (logits [1,V], k_new_0 [1,kv,T,hd], v_new_0, ...)

    A part of the decoder (``TextDecoder(layers=(a, b))``) takes the caches of its own layers and,
    unless it ends at the last layer, returns hidden_states [1,T,D] for the next part.

    ``mask`` is the 0/1 visibility; attention is exp(s - max s) * mask normalised, exactly softmax
    over the visible slots (hidden ones get exactly 0), with a small quantized range everywhere,
    computed over the cached slots and the new tokens as two blocks (no concatenation).
    """

    family = FAMILY_NAME  # read by models.family_of

    method_name = "text_decoder"

    def __init__(self, decoder: TextDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def cache_names(self) -> list[str]:
        return [f"{kind}_cache_{i}" for i in self.decoder.layer_ids for kind in ("k", "v")]

    def output_names(self) -> list[str]:
        first = "logits" if self.decoder.has_head else "hidden_states"
        return [first, *[n + "_new" for n in self.cache_names()]]

    def rope(self) -> dict:
        from ...host.static_decoder import rope_table

        return rope_table(self.decoder.inv_freq, self.decoder.axis_selector)

    def host_inputs(self, position_ids: torch.Tensor, cache_position: torch.Tensor):
        """cos, sin and mask for a call that writes ``cache_position`` (contiguous slots)."""
        from ...host.static_decoder import attention_mask, rotary_cos_sin

        cos, sin = rotary_cos_sin(self.rope(), position_ids.numpy())
        mask = attention_mask(int(cache_position[0]), cache_position.numel(), self.decoder.max_context)
        return torch.from_numpy(cos), torch.from_numpy(sin), torch.from_numpy(mask)

    def forward(self, inputs_embeds, cos, sin, mask, *caches):
        d = self.decoder
        x = inputs_embeds
        rot = d.rope_rot
        C = d.max_context
        t = d.t
        mask = group_mask(mask, t.num_heads // t.num_kv_heads)  # the stacked query heads of grouped_attention
        new: list[torch.Tensor] = []
        for i, layer in enumerate(d.decoder_layers()):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            b, T, _ = h.shape
            q, k, v = rotary_qkv(a, h, cos, sin, rot)
            scale = a.head_dim**-0.5
            qg = q.reshape(b, a.num_kv, a.num_heads // a.num_kv * T, a.head_dim)  # no KV head repeated
            # past slots and new tokens as two score blocks, never concatenated: a concat of the
            # cache input with the new keys put the HTP 1.3 dB from the PyTorch simulation
            s_past = torch.matmul(qg, caches[2 * i].transpose(-2, -1)) * scale
            s_new = torch.matmul(qg, k.transpose(-2, -1)) * scale
            top = torch.maximum(s_past.amax(dim=-1, keepdim=True), s_new.amax(dim=-1, keepdim=True))
            w_past = torch.exp(s_past - top) * mask[..., :C]
            w_new = torch.exp(s_new - top) * mask[..., C:]
            total = w_past.sum(dim=-1, keepdim=True) + w_new.sum(dim=-1, keepdim=True)
            att = ((torch.matmul(w_past, caches[2 * i + 1]) + torch.matmul(w_new, v)) / total).reshape(
                b, a.num_heads, T, -1
            )
            x = layer.after_attention(x, a.o_proj(att.transpose(1, 2).reshape(b, T, -1)))
            new += [k, v]
        if not d.has_head:  # a part before the last
            return (x, *new)
        logits = d.lm_head(d.norm(x[:, -1:, :]))[:, 0]
        return (logits, *new)


class TextDecoderStateful(nn.Module):
    """The decoder for Core ML: the KV cache is model state (Core ML states, fp16), written by
    slice assignment at ``cache_start`` (a traced ``.item()``: ``index_put`` does not convert);
    the host computes the M-RoPE cos/sin and a finite additive mask over all C slots (an
    infinite mask becomes a NaN constant on this conversion path). SDPA's ``enable_gqa`` does not
    convert; ``grouped_attention`` stacks the query heads of each KV head instead of repeating keys.

    (inputs_embeds [1,T,D], cos [1,1,T,hd], sin [1,1,T,hd], mask [1,1,T,C], cache_start [1] int32)
        -> logits [1,V]; states k_cache_i / v_cache_i [1, kv, C, hd]

    A part of the decoder (``TextDecoder(layers=(a, b))``) holds the states of its own layers and,
    unless it ends at the last layer, returns hidden_states [1,T,D] for the next part.
    """

    family = FAMILY_NAME  # read by models.family_of

    method_name = "text_decoder"

    def __init__(self, decoder: TextDecoder) -> None:
        super().__init__()
        self.decoder = decoder
        t = decoder.t
        shape = (1, t.num_kv_heads, decoder.max_context, t.head_dim)
        for i in decoder.layer_ids:  # a part (decoder.layer_ids) holds its own layers' caches
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape, dtype=torch.float16), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape, dtype=torch.float16), persistent=False)

    def cache_names(self) -> list[str]:
        return [f"{kind}_cache_{i}" for i in self.decoder.layer_ids for kind in ("k", "v")]

    def forward(self, inputs_embeds, cos, sin, mask, cache_start):
        d = self.decoder
        dtype = d.compute_dtype  # fp32 inputs, weights in fp16 when exported for Core ML
        x, cos, sin, mask = (t.to(dtype) for t in (inputs_embeds, cos, sin, mask))
        T = x.shape[1]
        start = cache_start[0].item()
        torch._check_is_size(start)
        torch._check(start + T <= d.max_context)
        mask = group_mask(mask, d.t.num_heads // d.t.num_kv_heads)
        for i, layer in zip(d.layer_ids, d.decoder_layers()):
            a = layer.self_attn
            q, k, v = rotary_qkv(a, layer.input_layernorm(x), cos, sin, d.rope_rot)
            k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            k_cache[:, :, start : start + T] = k.to(k_cache.dtype)
            v_cache[:, :, start : start + T] = v.to(v_cache.dtype)
            att = grouped_attention(q, k_cache.to(q.dtype), v_cache.to(q.dtype), mask, a.head_dim**-0.5)
            x = layer.after_attention(x, a.o_proj(att.transpose(1, 2).reshape(1, T, -1)))
        if not d.has_head:  # a part before the last: hidden states [1, T, D] for the next part
            return x.float()
        return d.lm_head(d.norm(x[:, -1:, :]))[:, 0].float()


# ----------------------------------------------------------------------------------------
# Audio (optional GLM-ASR tower)
# ----------------------------------------------------------------------------------------
