"""The GLM-4 text side: the token embedding and the decoder with a static KV cache held as module
state, explicit 3-axis M-RoPE positions and cache positions as inputs, the causal mask built from
the cache positions with finite values (Core ML turns ``-inf`` masks into NaN constants), logits
for the last position only. This form is what xnnpack exports."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import (
    RMSNorm,
    cached_attention,
    group_mask,
    grouped_attention,
    inv_frequencies,
    rotary_qkv,
    rotation_matrix,
)
from .layout import TEXT_PREFIX
from .spec import FAMILY_NAME, ModelSpec, TextSpec


class TokenEmbedding(nn.Module):
    """input_ids [1, T] int64 -> embeddings [1, T, D]."""

    family = FAMILY_NAME  # read by models.family_of

    method_name = "token_embedding"

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.text.vocab_size, spec.text.hidden_size)

    def weight_map(self) -> dict[str, tuple[str, object]]:
        return {"embed_tokens.weight": (TEXT_PREFIX + "embed_tokens.weight", None)}

    def init_runtime_buffers(self) -> None:
        pass

    def example_inputs(self, length: int = 4) -> tuple[torch.Tensor]:
        return (torch.arange(length, dtype=torch.long).unsqueeze(0),)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids).float()


# ----------------------------------------------------------------------------------------
# Text decoder
# ----------------------------------------------------------------------------------------


def mrope_axis_selector(t: TextSpec) -> torch.Tensor:
    """[3, 1, head_dim/2] one-hot: which position axis (t, h, w) drives each rotary frequency.
    Frequencies past the rotary width (inv_freq 0) take axis 0; their angle is 0 either way."""
    sel = torch.zeros(3, 1, t.head_dim // 2)
    sel[0, 0, t.rotary_dim // 2 :] = 1.0
    start = 0
    for i, n in enumerate(t.mrope_section):
        sel[i % 3, 0, start : start + n] = 1.0
        start += n
    return sel


def cache_shapes(t: TextSpec, max_context: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The KV cache held as module state (the xnnpack program's, the PyTorch references'): keys
    [kv, head_dim, C] and values [kv, C, head_dim], the operands ``cached_attention``'s batched
    matmuls take as they are. In the [1, kv, C, head_dim] form of the explicit caches, XNNPACK
    reshaped both to 3-D and transposed the keys, three copies of the whole cache per layer per
    token (at 9B widths and 2,048 slots 0.31 of the attention's 0.57 ms per layer, measured)."""
    return (t.num_kv_heads, t.head_dim, max_context), (t.num_kv_heads, max_context, t.head_dim)


class TextAttention(nn.Module):
    def __init__(self, t: TextSpec, max_context: int) -> None:
        super().__init__()
        self.t = t
        self.num_heads, self.num_kv, self.head_dim = t.num_heads, t.num_kv_heads, t.head_dim
        self.q_proj = nn.Linear(t.hidden_size, t.num_heads * t.head_dim, bias=True)
        self.k_proj = nn.Linear(t.hidden_size, t.num_kv_heads * t.head_dim, bias=True)
        self.v_proj = nn.Linear(t.hidden_size, t.num_kv_heads * t.head_dim, bias=True)
        self.o_proj = nn.Linear(t.num_heads * t.head_dim, t.hidden_size, bias=False)
        k_shape, v_shape = cache_shapes(t, max_context)
        self.register_buffer("k_cache", torch.zeros(k_shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(v_shape), persistent=False)

    def forward(self, x, cos, sin, rot, mask, cache_position, kv=None):
        """With ``kv=None`` the cache is this module's state (updated in place); with
        ``kv=(k_cache, v_cache)`` it is passed in and the updated copies are returned too."""
        b, T, _ = x.shape
        q, k, v = rotary_qkv(self, x, cos, sin, rot)
        scale = self.head_dim**-0.5
        if kv is None:  # the state's layout: cache_shapes
            kv_heads, d = self.num_kv, self.head_dim
            self.k_cache.index_copy_(
                2, cache_position, k.reshape(kv_heads, -1, d).transpose(1, 2).to(self.k_cache.dtype)
            )
            self.v_cache.index_copy_(1, cache_position, v.reshape(kv_heads, -1, d).to(self.v_cache.dtype))
            att = cached_attention(q, self.k_cache.to(q.dtype), self.v_cache.to(q.dtype), mask, scale)
        else:
            kv = (
                kv[0].index_copy(2, cache_position, k.to(kv[0].dtype)),
                kv[1].index_copy(2, cache_position, v.to(kv[1].dtype)),
            )
            att = grouped_attention(q, kv[0].to(q.dtype), kv[1].to(q.dtype), mask, scale)
        out = self.o_proj(att.transpose(1, 2).reshape(b, T, -1))
        return out if kv is None else (out, kv)


class TextMLP(nn.Module):
    def __init__(self, t: TextSpec) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(t.hidden_size, 2 * t.intermediate_size, bias=False)
        self.down_proj = nn.Linear(t.intermediate_size, t.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_proj"):
            return self.down_proj(self.up_proj(x) * F.silu(self.gate_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))

    def split_fused_projections(self) -> None:
        """Two projections (rows ``:I`` and ``I:`` of the same, possibly quantized, weight) instead of
        one whose output is split in halves: XNNPACK has no split of a tensor whose token axis is
        dynamic, and that split cut every layer's delegate in two. Each output is its own row's dot
        product, so the values are the same (checked equal for torchao's 8da4w / 8da8w weights)."""
        w = self.gate_up_proj.weight
        half = w.shape[0] // 2
        for name, rows in (("gate_proj", w[:half]), ("up_proj", w[half:])):
            proj = nn.Linear(w.shape[1], half, bias=False, device="meta")
            proj.weight = nn.Parameter(rows, requires_grad=False)
            setattr(self, name, proj)
        del self.gate_up_proj


class DecoderLayer(nn.Module):
    def __init__(self, t: TextSpec, max_context: int) -> None:
        super().__init__()
        self.self_attn = TextAttention(t, max_context)
        self.mlp = TextMLP(t)
        self.input_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.post_self_attn_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.post_mlp_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)

    def forward(self, x, cos, sin, rot, mask, cache_position, kv=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, rot, mask, cache_position, kv)
        if kv is not None:
            attn, kv = attn
        x = self.after_attention(x, attn)
        return x if kv is None else (x, kv)

    def after_attention(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        # sandwich norms: each sub-block's output is normalised before the residual add
        x = x + self.post_self_attn_layernorm(attn)
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class TextDecoder(nn.Module):
    """(inputs_embeds [1,T,D], position_ids [3,T], cache_position [T]) -> logits of the last token [1, V].

    The KV cache is module state: each call writes positions ``cache_position`` and attends to
    every cache slot at or before its own position.

    ``layers=(a, b)`` builds only decoder layers a..b-1 (a *part*, lowered and written on its own
    so that peak memory does not grow with the layer count): weights keep their full-model names
    (``layers.{i}.…``), the part maps hidden states [1,T,D] -> [1,T,D], and only the part that
    ends at the last layer holds the final norm and lm_head and returns logits.
    """

    family = FAMILY_NAME  # read by models.family_of

    method_name = "text_decoder"

    def __init__(self, spec: ModelSpec, max_context: int, layers: tuple[int, int] | None = None) -> None:
        super().__init__()
        t = spec.text
        self.t = t
        self.max_context = max_context
        first, end = layers or (0, t.num_layers)
        if not 0 <= first < end <= t.num_layers:
            raise ValueError(f"layers {layers}: need 0 <= a < b <= {t.num_layers}")
        self.layer_ids = list(range(first, end))
        self.has_head = end == t.num_layers
        # placeholders without weights keep the real layer indices in the parameter names
        self.layers = nn.ModuleList(DecoderLayer(t, max_context) if i >= first else nn.Identity() for i in range(end))
        if self.has_head:
            self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
            self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.empty(t.head_dim // 2), persistent=False)
        self.register_buffer("axis_selector", torch.empty(3, 1, t.head_dim // 2), persistent=False)
        self.register_buffer("slots", torch.empty(max_context, dtype=torch.long), persistent=False)
        self.register_buffer("rope_rot", torch.empty(t.head_dim, t.head_dim), persistent=False)

    def decoder_layers(self) -> list["DecoderLayer"]:
        return [self.layers[i] for i in self.layer_ids]

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.layers[self.layer_ids[0]].input_layernorm.weight.dtype

    def weight_map(self) -> dict[str, tuple[str, object]]:
        out: dict[str, tuple[str, object]] = {}
        for name, _ in self.named_parameters():
            if name == "lm_head.weight":
                key = TEXT_PREFIX + "embed_tokens.weight" if self.t.tie_word_embeddings else "lm_head.weight"
                out[name] = (key, None)
            else:
                out[name] = (TEXT_PREFIX + name, None)
        return out

    def init_runtime_buffers(self) -> None:
        t = self.t
        rd = t.rotary_dim
        # zero frequencies past the rotary width: cos = 1, sin = 0 exactly, so the partial rotary
        # needs no slicing, padding or concatenation in the graph
        self.inv_freq = torch.cat([inv_frequencies(t.rope_theta, rd), torch.zeros(t.head_dim // 2 - rd // 2)])
        self.axis_selector = mrope_axis_selector(t)
        self.slots = torch.arange(self.max_context, dtype=torch.long)
        self.rope_rot = rotation_matrix(t.head_dim, rd, interleaved=True)
        for layer in self.decoder_layers():
            attn = layer.self_attn
            k_shape, v_shape = cache_shapes(t, self.max_context)
            attn.k_cache = torch.zeros(k_shape)
            attn.v_cache = torch.zeros(v_shape)

    def reset_cache(self) -> None:
        for layer in self.decoder_layers():
            layer.self_attn.k_cache.zero_()
            layer.self_attn.v_cache.zero_()

    def example_inputs(self, length: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        embeds = torch.randn(1, length, self.t.hidden_size, generator=g)
        pos = torch.arange(length, dtype=torch.long)
        return embeds, pos.unsqueeze(0).expand(3, length).contiguous(), pos

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, head_dim]: M-RoPE on the first rotary_dim dims (pairs share a frequency),
        identity (cos 1, sin 0) on the rest."""
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # [3, T, head_dim/2]
        freqs = (freqs * self.axis_selector).sum(0)  # each frequency takes its own axis
        cos = torch.stack([freqs.cos(), freqs.cos()], dim=-1).flatten(-2)
        sin = torch.stack([freqs.sin(), freqs.sin()], dim=-1).flatten(-2)
        return cos.to(dtype), sin.to(dtype)

    def forward(
        self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor
    ) -> torch.Tensor:
        return self.run(inputs_embeds, position_ids, cache_position)

    def run(self, inputs_embeds, position_ids, cache_position, caches: list[torch.Tensor] | None = None):
        """Shared body: stateful cache when ``caches`` is None, else explicit [k0, v0, k1, v1, ...]."""
        x = inputs_embeds.to(self.compute_dtype)
        cos, sin = self.rotary(position_ids, x.dtype)
        rot = self.rope_rot.to(x.dtype)
        visible = self.slots.unsqueeze(0) <= cache_position.unsqueeze(1)  # [T, C]
        mask = torch.where(visible, 0.0, torch.finfo(x.dtype).min).to(x.dtype)
        mask = group_mask(mask.unsqueeze(0), self.t.num_heads // self.t.num_kv_heads)  # [1, g * T, C]
        new_caches: list[torch.Tensor] = []
        for i, layer in enumerate(self.decoder_layers()):
            if caches is None:
                x = layer(x, cos, sin, rot, mask, cache_position)
            else:
                x, kv = layer(x, cos, sin, rot, mask, cache_position, (caches[2 * i], caches[2 * i + 1]))
                new_caches += kv
        if not self.has_head:  # a part before the last: every position's hidden state feeds the next part
            out = x.float()
            return out if caches is None else (out, *new_caches)
        # keep the last position 3-D so every exporter emits a MatMul (weight quantizers skip Gemm)
        logits = self.lm_head(self.norm(x[:, -1:, :]))[:, 0].float()
        return logits if caches is None else (logits, *new_caches)
