"""The optional GLM-ASR audio tower (Whisper-style encoder + projector) of AutoGLM checkpoints
that carry an ``audio_config``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import attention, inv_frequencies, repeat_kv, rotary_qkv, rotation_matrix
from .spec import FAMILY_NAME, ModelSpec


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

    family = FAMILY_NAME  # read by models.family_of

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
