"""Building blocks shared by the GLM-4.1V towers: RMSNorm, rotary tables, attention (grouped
for GQA without expanding keys and values), the gated MLP."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, spelled out: SDPA's decomposition adds NaN guards
    (any / where / logical_not) that no delegate takes."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
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


def cached_attention(
    q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """``grouped_attention`` over a cache of one sequence held as two batched-matmul operands:
    keys transposed ``k_t`` [kv, d, C] and values ``v`` [kv, C, d] (q [1, H, T, d], mask
    [1, g * T, C] from ``group_mask``). Each product reads the cache where it lies: no reshape
    or transpose of it in the graph."""
    b, H, T, d = q.shape
    kv = k_t.shape[0]
    stacked = q.reshape(kv, H // kv * T, d)
    scores = torch.bmm(stacked, k_t) * scale + mask
    return torch.bmm(torch.softmax(scores.float(), dim=-1).to(q.dtype), v).reshape(b, H, T, d)


def group_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """A [.., T, C] mask for ``grouped_attention``'s stacked queries: [.., groups * T, C]."""
    return mask if groups == 1 else mask.repeat(*[1] * (mask.dim() - 2), groups, 1)


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
