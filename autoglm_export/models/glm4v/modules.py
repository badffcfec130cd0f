"""Export-ready GLM-4.1V components, written for torch.export with static shapes.

Differences from transformers' modelling code, each kept numerically identical to it:
* vision: one fixed image size, so the interpolated position table and the 2-D rotary tables
  are computed once from the checkpoint and baked as buffers; the Conv3d patch embedding sees
  two identical frames for a still image, so it is folded into a Conv2d (kernel summed over
  time); one attention segment, no ``cu_seqlens``; every tensor stays <= 5-D (XNNPACK).
* text: a static KV cache held as module state, explicit 3-axis M-RoPE positions and cache
  positions as inputs, the causal mask built from the cache positions with finite values
  (Core ML turns ``-inf`` masks into NaN constants), logits for the last position only.

Modules are built on the meta device and filled one tensor at a time (see ``load.py``);
``init_runtime_buffers`` creates the rotary tables and caches afterwards.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layout import TEXT_PREFIX, VISION_METHOD, VISION_PREFIX
from .spec import ModelSpec, TextSpec, VisionSpec


FP16_TINY = 2.0**-14  # the smallest normal fp16 number


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    # NPU exports set this: the plain rms_norm pattern is fused into one RmsNorm op there (QNN's
    # quantized Sqrt/Reciprocal lose the small-norm inputs), while XNNPACK needs the 4-D mean
    plain = False
    # Core ML sets this: every op runs in fp16, where x*x overflows past |x| = 256 and vanishes
    # below 2^-12. Dividing by max|x| first keeps the squares in range; the epsilon is divided by
    # max|x|^2 with them. (coremltools' own rms_norm lowering scales x but not the epsilon, which
    # dropped a transformers-initialised checkpoint's decoder to 6 dB against its reference.)
    scaled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaled:
            # constants as tensors of x's dtype: coremltools promotes a Python float operand to fp32
            tiny, root_eps = (torch.tensor(v, dtype=x.dtype) for v in (FP16_TINY, math.sqrt(self.eps)))
            m = x.abs().amax(dim=-1, keepdim=True) + tiny  # any m > 0 gives the same norm; never 0
            xs = x / m
            e = root_eps / m  # (sqrt(eps)/m)^2 stays in fp16 range where eps/m^2's m^2 would not
            y = self.weight * (xs * torch.rsqrt((xs * xs).mean(dim=-1, keepdim=True) + e * e))
            # coremltools types the rsqrt chain fp32 and a following conv then fails on its fp16 bias;
            # an explicit round trip gives the value a declared fp16 type (the fp16 pass folds it)
            return y.float().to(x.dtype)
        if self.plain:
            # in fp32 even for an fp16 module: coremltools 9.0 lowers an fp16 rms_norm with an fp32 eps
            # (type error); its fp16 pass casts the fp32 op back to fp16 in the program
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(mean_last_dim(xf * xf) + self.eps)).to(x.dtype)


def mean_last_dim(x: torch.Tensor) -> torch.Tensor:
    """mean(-1, keepdim=True) written as a 4-D mean over dims (2, 3): the only mean XNNPACK
    delegates; a plain last-dim mean splits the graph around every norm."""
    lead = x.shape[:-1]
    return x.reshape(1, -1, x.shape[-1], 1).mean(dim=(2, 3), keepdim=True).reshape(*lead, 1)


def inv_frequencies(theta: float, dim: int) -> torch.Tensor:
    """RoPE inverse frequencies for ``dim`` rotary dims: theta^(-2i/dim), i < dim/2."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, kv_heads, n, d] -> [b, kv_heads * groups, n, d] (each KV head serves ``groups`` query
    heads), spelled out because SDPA's enable_gqa does not convert everywhere."""
    if groups == 1:
        return x
    b, kv, n, d = x.shape
    return x.unsqueeze(2).expand(b, kv, groups, n, d).reshape(b, kv * groups, n, d)


def rotation_matrix(dim: int, rotary: int, interleaved: bool) -> torch.Tensor:
    """R with x @ R == rotate(x) on the first ``rotary`` dims and 0 elsewhere.

    Rotary embedding as ``x * cos + (x @ R) * sin`` (cos = 1, sin = 0 past ``rotary``) is one
    delegated matmul instead of slices, negations and concatenations per layer; every output is
    a single +/-1 multiple of one input, so the result is exactly the same.
    """
    r = torch.zeros(dim, dim)
    if interleaved:  # pairs (2i, 2i+1): (a, b) -> (-b, a)
        for i in range(0, rotary, 2):
            r[i + 1, i] = -1.0
            r[i, i + 1] = 1.0
    else:  # halves: (a, b) -> (-b, a)
        half = rotary // 2
        for i in range(half):
            r[i + half, i] = -1.0
            r[i, i + half] = 1.0
    return r


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, spelled out: SDPA's decomposition adds NaN guards
    (any / where / logical_not) that no delegate takes."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``attention`` for grouped-query heads (q [b, H, T, d], k/v [b, kv, C, d], H = kv * g) without
    expanding the keys and values to H heads: the g query heads of each KV head are stacked along
    the query axis, so each matmul reads the cache once. Expanded, the 9B's cache (2 -> 32 heads,
    2048 slots) was a 64 MiB copy per layer per decoded token, outside the XNNPACK delegate.
    ``mask`` is in the stacked form [.., g * T, C] (``group_mask``, made once per call)."""
    b, H, T, d = q.shape
    kv = k.shape[1]
    if kv == H:
        return attention(q, k, v, mask, scale)
    out = attention(q.reshape(b, kv, H // kv * T, d), k, v, mask, scale)
    return out.reshape(b, H, T, d)


def group_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """A [.., T, C] mask for ``grouped_attention``'s stacked queries: [.., groups * T, C]."""
    return mask if groups == 1 else mask.repeat(1, 1, groups, 1)


def rotary_qkv(attn: nn.Module, x: torch.Tensor, cos, sin, rot):
    """q, k, v [b, heads, n, head_dim] of an attention module's projections, rotary applied
    (cos = 1, sin = 0 on the non-rotary dims)."""
    b, n, _ = x.shape
    q = attn.q_proj(x).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, attn.num_kv, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, n, attn.num_kv, attn.head_dim).transpose(1, 2)
    return q * cos + torch.matmul(q, rot) * sin, k * cos + torch.matmul(k, rot) * sin, v


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------------------
# Vision
# ----------------------------------------------------------------------------------------


def vision_patch_positions(grid_h: int, grid_w: int, merge: int) -> torch.Tensor:
    """(h, w) of every patch in block-major order (each merge window contiguous): [N, 2]."""
    hpos, wpos = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    shape = (grid_h // merge, merge, grid_w // merge, merge)
    hpos = hpos.reshape(shape).transpose(1, 2).flatten()
    wpos = wpos.reshape(shape).transpose(1, 2).flatten()
    return torch.stack([hpos, wpos], dim=-1)


def interpolate_position_table(table: torch.Tensor, positions: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Resample the learned square position table to the patch grid (bicubic, as transformers)."""
    n, dim = table.shape
    side = int(math.isqrt(n))
    table_2d = table.view(side, side, dim).permute(2, 0, 1).unsqueeze(0).float()
    h = positions[:, 0].float()
    w = positions[:, 1].float()
    norm_w = ((w + 0.5) / grid_w) * 2 - 1
    norm_h = ((h + 0.5) / grid_h) * 2 - 1
    grid = torch.stack((norm_w, norm_h), dim=-1).unsqueeze(0).unsqueeze(2)
    out = F.grid_sample(table_2d, grid, mode="bicubic", align_corners=False, padding_mode="border")
    return out.squeeze(0).squeeze(-1).permute(1, 0).to(table.dtype).contiguous()


class VisionAttention(nn.Module):
    def __init__(self, v: VisionSpec) -> None:
        super().__init__()
        self.num_heads, self.head_dim = v.num_heads, v.head_dim
        self.qkv = nn.Linear(v.hidden_size, 3 * v.hidden_size, bias=v.attention_bias)
        self.proj = nn.Linear(v.hidden_size, v.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, self.head_dim)
        dtype = qkv.dtype
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        # 2-D rotary in fp32, as transformers does. R is applied to all of qkv (v's third is
        # dropped): on that contiguous view x @ R is one 2-D matmul, while on q and k alone
        # (strided slices) torch broadcasts R to every patch, which ExecuTorch stores as a
        # [patches, hd, hd] fp32 constant (38 MB at 9B widths)
        turned = torch.matmul(qkv.float(), rot).unbind(1)
        q, k, v = qkv.unbind(1)
        q = (q.float() * cos + turned[0] * sin).to(dtype)
        k = (k.float() * cos + turned[1] * sin).to(dtype)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        out = attention(q, k, v, None, self.head_dim**-0.5)
        return self.proj(out.transpose(0, 1).reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, v: VisionSpec) -> None:
        super().__init__()
        self.norm1 = RMSNorm(v.hidden_size, v.rms_norm_eps)
        self.norm2 = RMSNorm(v.hidden_size, v.rms_norm_eps)
        self.attn = VisionAttention(v)
        self.mlp = GatedMLP(v.hidden_size, v.out_hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, rot)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, context_dim, bias=False)
        self.up_proj = nn.Linear(dim, context_dim, bias=False)
        self.down_proj = nn.Linear(context_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.post_projection_norm(self.proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionEncoder(nn.Module):
    """pixel_values [N, C*P*P] (block-major patches of one frame) -> image embeddings [N/m^2, D].

    One static image size (height, width) per instance: each recipe bucket is its own method."""

    method_name = VISION_METHOD

    def __init__(self, spec: ModelSpec, image_size: int | tuple[int, int]) -> None:
        super().__init__()
        v = spec.vision
        self.v = v
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.image_size = (h, w)
        self.grid_h, self.grid_w = h // v.patch_size, w // v.patch_size
        self.num_patches = self.grid_h * self.grid_w
        self.patch_embed = nn.Conv2d(v.in_channels, v.hidden_size, v.patch_size, v.patch_size)
        self.post_conv_layernorm = RMSNorm(v.hidden_size, v.rms_norm_eps)
        self.register_buffer("pos_embed", torch.empty(self.num_patches, v.hidden_size))
        self.blocks = nn.ModuleList(VisionBlock(v) for _ in range(v.depth))
        self.post_layernorm = RMSNorm(v.hidden_size, v.rms_norm_eps)
        m = v.spatial_merge_size
        self.downsample = nn.Conv2d(v.hidden_size, v.out_hidden_size, m, m)
        self.merger = PatchMerger(v.out_hidden_size, v.intermediate_size)
        self.register_buffer("rope_cos", torch.empty(self.num_patches, v.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(self.num_patches, v.head_dim), persistent=False)
        self.register_buffer("rope_rot", torch.empty(v.head_dim, v.head_dim), persistent=False)

    @property
    def num_tokens(self) -> int:
        return self.num_patches // self.v.spatial_merge_size**2

    def patch_positions(self) -> torch.Tensor:
        return vision_patch_positions(self.grid_h, self.grid_w, self.v.spatial_merge_size)

    def weight_map(self) -> dict[str, tuple[str, object]]:
        p = VISION_PREFIX
        out: dict[str, tuple[str, object]] = {
            "patch_embed.weight": (p + "patch_embed.proj.weight", lambda w: w.sum(dim=2)),
            "patch_embed.bias": (p + "patch_embed.proj.bias", None),
            "pos_embed": (
                p + "embeddings.position_embedding.weight",
                lambda t: interpolate_position_table(t, self.patch_positions(), self.grid_h, self.grid_w),
            ),
        }
        for name, _ in self.named_parameters():
            if not name.startswith("patch_embed."):
                out[name] = (p + name, None)
        return out

    def init_runtime_buffers(self) -> None:
        v = self.v
        pos = self.patch_positions()
        freqs = pos[..., None].float() * inv_frequencies(v.rope_theta, v.head_dim // 2)  # [N, 2, hd/4]
        hw = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        full = torch.cat([hw, hw], dim=-1)
        self.rope_cos = full.cos()
        self.rope_sin = full.sin()
        self.rope_rot = rotation_matrix(v.head_dim, v.head_dim, interleaved=False)

    def example_inputs(self) -> tuple[torch.Tensor]:
        v = self.v
        g = torch.Generator().manual_seed(0)
        return (torch.randn(self.num_patches, v.in_channels * v.patch_size**2, generator=g),)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        v = self.v
        n = self.num_patches
        x = pixel_values.view(n, v.in_channels, v.patch_size, v.patch_size).to(self.patch_embed.weight.dtype)
        x = self.patch_embed(x).view(n, v.hidden_size)
        x = self.post_conv_layernorm(x)
        x = x + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = blk(x, self.rope_cos, self.rope_sin, self.rope_rot)
        x = self.post_layernorm(x)
        m = v.spatial_merge_size
        x = x.view(-1, m, m, v.hidden_size).permute(0, 3, 1, 2)
        x = self.downsample(x).view(-1, v.out_hidden_size)
        return self.merger(x).float()


# ----------------------------------------------------------------------------------------
# Token embedding
# ----------------------------------------------------------------------------------------


class TokenEmbedding(nn.Module):
    """input_ids [1, T] int64 -> embeddings [1, T, D]."""

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


class TextAttention(nn.Module):
    def __init__(self, t: TextSpec, max_context: int) -> None:
        super().__init__()
        self.t = t
        self.num_heads, self.num_kv, self.head_dim = t.num_heads, t.num_kv_heads, t.head_dim
        self.q_proj = nn.Linear(t.hidden_size, t.num_heads * t.head_dim, bias=True)
        self.k_proj = nn.Linear(t.hidden_size, t.num_kv_heads * t.head_dim, bias=True)
        self.v_proj = nn.Linear(t.hidden_size, t.num_kv_heads * t.head_dim, bias=True)
        self.o_proj = nn.Linear(t.num_heads * t.head_dim, t.hidden_size, bias=False)
        shape = (1, t.num_kv_heads, max_context, t.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def forward(self, x, cos, sin, rot, mask, cache_position, kv=None):
        """With ``kv=None`` the cache is this module's state (updated in place); with
        ``kv=(k_cache, v_cache)`` it is passed in and the updated copies are returned too."""
        b, T, _ = x.shape
        q, k, v = rotary_qkv(self, x, cos, sin, rot)
        if kv is None:
            self.k_cache.index_copy_(2, cache_position, k.to(self.k_cache.dtype))
            self.v_cache.index_copy_(2, cache_position, v.to(self.v_cache.dtype))
            keys, values = self.k_cache.to(q.dtype), self.v_cache.to(q.dtype)
        else:
            kv = (kv[0].index_copy(2, cache_position, k.to(kv[0].dtype)), kv[1].index_copy(2, cache_position, v.to(kv[1].dtype)))
            keys, values = kv[0].to(q.dtype), kv[1].to(q.dtype)
        out = self.o_proj(grouped_attention(q, keys, values, mask, self.head_dim**-0.5).transpose(1, 2).reshape(b, T, -1))
        return out if kv is None else (out, kv)


class TextMLP(nn.Module):
    def __init__(self, t: TextSpec) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(t.hidden_size, 2 * t.intermediate_size, bias=False)
        self.down_proj = nn.Linear(t.intermediate_size, t.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


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
            shape = (1, t.num_kv_heads, self.max_context, t.head_dim)
            attn.k_cache = torch.zeros(shape)
            attn.v_cache = torch.zeros(shape)

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

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        return self.run(inputs_embeds, position_ids, cache_position)

    def run(self, inputs_embeds, position_ids, cache_position, caches: list[torch.Tensor] | None = None):
        """Shared body: stateful cache when ``caches`` is None, else explicit [k0, v0, k1, v1, ...]."""
        x = inputs_embeds.to(self.compute_dtype)
        cos, sin = self.rotary(position_ids, x.dtype)
        rot = self.rope_rot.to(x.dtype)
        visible = self.slots.unsqueeze(0) <= cache_position.unsqueeze(1)  # [T, C]
        mask = torch.where(visible, 0.0, torch.finfo(x.dtype).min).to(x.dtype)
        mask = group_mask(mask.unsqueeze(0).unsqueeze(0), self.t.num_heads // self.t.num_kv_heads)
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


class TextDecoderExplicitCache(nn.Module):
    """The same decoder with the KV cache as inputs and outputs (ONNX Runtime has no module state):
    (inputs_embeds, position_ids, cache_position, k_0, v_0, ...) -> (logits, k_0', v_0', ...)."""

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
            att = ((torch.matmul(w_past, caches[2 * i + 1]) + torch.matmul(w_new, v)) / total).reshape(b, a.num_heads, T, -1)
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


class AudioAttention(nn.Module):
    def __init__(self, a) -> None:
        super().__init__()
        self.num_heads, self.num_kv, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, a.num_heads * a.head_dim, bias=True)
        self.k_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=False)
        self.v_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=True)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=True)

    def forward(self, x, cos, sin, rot):
        b, n, _ = x.shape
        q, k, v = rotary_qkv(self, x, cos, sin, rot)
        groups = self.num_heads // self.num_kv
        out = attention(q, repeat_kv(k, groups), repeat_kv(v, groups), None, self.head_dim**-0.5)  # bidirectional
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class AudioMLP(nn.Module):
    def __init__(self, a) -> None:
        super().__init__()
        self.fc1 = nn.Linear(a.hidden_size, a.intermediate_size)
        self.fc2 = nn.Linear(a.intermediate_size, a.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class AudioLayer(nn.Module):
    def __init__(self, a) -> None:
        super().__init__()
        self.self_attn = AudioAttention(a)
        self.mlp = AudioMLP(a)
        self.input_layernorm = nn.LayerNorm(a.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(a.hidden_size)

    def forward(self, x, cos, sin, rot):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, rot)
        return x + self.mlp(self.post_attention_layernorm(x))


class AudioProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, 2 * out_dim)
        self.linear_2 = nn.Linear(2 * out_dim, out_dim)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))


class AudioEncoder(nn.Module):
    """input_features [1, mel_bins, frames] (log-mel of a fixed window) -> audio embeddings [frames/8, D].

    Frames halve in the stride-2 conv, then every 4 encoder frames become one LM token."""

    method_name = "audio_encoder"

    def __init__(self, spec: ModelSpec, frames: int) -> None:
        super().__init__()
        from .audio_spec import MERGE

        a = spec.audio
        if frames % (2 * MERGE):
            raise ValueError(f"audio frames {frames} must be a multiple of {2 * MERGE}")
        self.a, self.frames, self.merge = a, frames, MERGE
        self.positions = frames // 2
        self.conv1 = nn.Conv1d(a.num_mel_bins, a.hidden_size, 3, padding=1)
        self.conv2 = nn.Conv1d(a.hidden_size, a.hidden_size, 3, stride=2, padding=1)
        self.layers = nn.ModuleList(AudioLayer(a) for _ in range(a.num_layers))
        self.norm = nn.LayerNorm(a.hidden_size)
        self.projector = AudioProjector(a.intermediate_size, spec.text.hidden_size)
        self.register_buffer("rope_cos", torch.empty(self.positions, a.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(self.positions, a.head_dim), persistent=False)
        self.register_buffer("rope_rot", torch.empty(a.head_dim, a.head_dim), persistent=False)

    @property
    def num_tokens(self) -> int:
        return self.positions // self.merge

    def weight_map(self) -> dict[str, tuple[str, object]]:
        from .audio_layout import AUDIO_PREFIX, PROJECTOR_PREFIX

        out = {}
        for name, _ in self.named_parameters():
            if name.startswith("projector."):
                out[name] = (PROJECTOR_PREFIX + name.removeprefix("projector."), None)
            else:
                out[name] = (AUDIO_PREFIX + name, None)
        return out

    def init_runtime_buffers(self) -> None:
        a = self.a
        rd = a.rotary_dim
        freqs = torch.arange(self.positions, dtype=torch.float).unsqueeze(1) * inv_frequencies(a.rope_theta, rd)
        ones = torch.ones(self.positions, a.head_dim - rd)
        self.rope_cos = torch.cat([freqs.cos(), freqs.cos(), ones], dim=-1)
        self.rope_sin = torch.cat([freqs.sin(), freqs.sin(), torch.zeros_like(ones)], dim=-1)
        self.rope_rot = rotation_matrix(a.head_dim, rd, interleaved=False)

    def example_inputs(self) -> tuple[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return (torch.randn(1, self.a.num_mel_bins, self.frames, generator=g),)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        x = input_features.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [1, frames/2, hidden]
        cos, sin, rot = (t.to(x.dtype) for t in (self.rope_cos, self.rope_sin, self.rope_rot))
        for layer in self.layers:
            x = layer(x, cos, sin, rot)
        x = self.norm(x).reshape(-1, self.a.intermediate_size)  # 4 frames -> 1 token
        return self.projector(x).float()
