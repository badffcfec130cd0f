"""The GLM-4.1V vision tower (ViT + patch merger) for one image bucket, written for torch.export:
the interpolated position table and the 2-D rotary tables are baked for the bucket's grid; the
Conv3d patch embedding sees two identical frames for a still image, so it is folded into a Conv2d
(kernel summed over time); one attention segment, no ``cu_seqlens``; every tensor stays <= 5-D
(XNNPACK)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import GatedMLP, RMSNorm, attention, inv_frequencies, rotation_matrix
from ...methods import VISION_METHOD
from .layout import VISION_PREFIX
from .spec import FAMILY_NAME, ModelSpec, VisionSpec


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

    family = FAMILY_NAME  # read by models.family_of

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
