"""Random checkpoints in the real GLM-4.1V layout, for tests, demos and scale benchmarks.

Same key names, config schema (nested ``text_config``), sharded bf16 safetensors with an index,
a byte-level BPE ``tokenizer.json`` whose special tokens sit at the ids the config names,
preprocessor and generation configs. ``Glm4vForConditionalGeneration.from_pretrained`` loads it.
Deterministic: every tensor is drawn from a generator seeded by (seed, tensor name).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .errors import ExportError
from .fsutil import atomic_output_dir
from .models import get_family
from .safetensors_io import write_safetensors

REAL_SPECIAL_BASE = 151329
# offsets from 151329, as in the released GLM-4.1V tokenizer
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
    "<|audio|>",
    "<|reserved_151348|>",
]
EOS_OFFSETS = (0, 7, 9, 19)  # 151329, 151336, 151338, 151348


@dataclass(frozen=True)
class Preset:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 512
    mrope_section: tuple[int, int, int] = (1, 1, 2)
    vision_depth: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int = 96
    image_size: int = 56
    max_shard_bytes: int = 256 * 1024
    full_vocab_tokenizer: bool = False
    audio_hidden: int = 32
    audio_layers: int = 2
    audio_heads: int = 2


PRESETS = {
    "tiny": Preset(),
    # real widths (GLM-4.1V-9B's config.json); depth chosen with --layers / --vision-depth
    "9b-shape": Preset(
        hidden=4096,
        layers=40,
        heads=32,
        kv_heads=2,
        intermediate=13696,
        vocab=151552,
        mrope_section=(8, 12, 12),
        vision_depth=24,
        vision_hidden=1536,
        vision_heads=12,
        vision_intermediate=13696,
        image_size=336,
        max_shard_bytes=4 * 1024**3,
        full_vocab_tokenizer=True,
    ),
    # ~102 M parameters for the CI memory guard (tests/test_memory_guard.py): its largest tensor
    # (gate_up_proj, 12.6 M) is an eighth of the total, so loading everything at once lands far
    # above a ceiling derived from that tensor; 4 layers keep the export to about a minute.
    "guard": Preset(
        hidden=1024,
        layers=4,
        heads=8,
        kv_heads=2,
        intermediate=6144,
        vocab=8192,
        mrope_section=(8, 12, 12),
        vision_depth=2,
        vision_hidden=256,
        vision_heads=4,
        vision_intermediate=1024,
        image_size=112,
        max_shard_bytes=64 * 1024**2,
    ),
}


def special_base(vocab: int, full: bool) -> int:
    return REAL_SPECIAL_BASE if full else vocab - 32


def audio_config(p: Preset) -> dict:
    """The GLM-ASR encoder fields (transformers' GlmAsrEncoderConfig) plus our token ids."""
    return {
        "model_type": "glmasr_encoder",
        "hidden_size": p.audio_hidden,
        "intermediate_size": 4 * p.audio_hidden,
        "num_hidden_layers": p.audio_layers,
        "num_attention_heads": p.audio_heads,
        "num_key_value_heads": p.audio_heads,
        "hidden_act": "gelu",
        "max_position_embeddings": 1500,
        "num_mel_bins": 128,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    }


def make_config(p: Preset, audio: bool = False) -> dict:
    base = special_base(p.vocab, p.full_vocab_tokenizer)
    extra = {}
    if audio:
        extra = {
            "audio_config": audio_config(p),
            "audio_token_id": base + 18,
            "audio_start_token_id": base + 16,
            "audio_end_token_id": base + 17,
            "projector_hidden_act": "gelu",
        }
    return {
        **extra,
        "architectures": ["Glm4vForConditionalGeneration"],
        "model_type": "glm4v",
        "dtype": "bfloat16",
        "image_token_id": base + 14,
        "image_start_token_id": base + 10,
        "image_end_token_id": base + 11,
        "video_token_id": base + 15,
        "video_start_token_id": base + 12,
        "video_end_token_id": base + 13,
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "glm4v_text",
            "hidden_act": "silu",
            "hidden_size": p.hidden,
            "intermediate_size": p.intermediate,
            "num_hidden_layers": p.layers,
            "num_attention_heads": p.heads,
            "num_key_value_heads": p.kv_heads,
            "vocab_size": p.vocab,
            "max_position_embeddings": 65536,
            "rms_norm_eps": 1e-05,
            "attention_dropout": 0.0,
            "pad_token_id": base,
            "use_cache": True,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": list(p.mrope_section),
            },
        },
        "vision_config": {
            "model_type": "glm4v_vision",
            "hidden_act": "silu",
            "depth": p.vision_depth,
            "hidden_size": p.vision_hidden,
            "num_heads": p.vision_heads,
            "intermediate_size": p.vision_intermediate,
            "out_hidden_size": p.hidden,
            "image_size": p.image_size,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "in_channels": 3,
            "rms_norm_eps": 1e-05,
            "attention_bias": False,
            "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
        },
    }


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


ROWS_PER_DRAW = 1 << 22  # elements drawn in fp32 at a time: the only float32 copy ever held


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Weights scaled so that a random model has a spread of logits (no near-ties in greedy tests).

    Drawn block by block into the bf16 result, so a 620M-parameter embedding never exists in fp32."""
    g = torch.Generator().manual_seed(_seed_for(seed, name))
    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight")):
        offset, scale = 1.0, 0.1
    elif name.endswith(".bias"):
        offset, scale = 0.0, 0.05
    elif "embed_tokens" in name or "position_embedding" in name:
        offset, scale = 0.0, 1.0
    else:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        offset, scale = 0.0, (4.0 if name == "lm_head.weight" else 1.0) / math.sqrt(fan_in)
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    for start in range(0, flat.numel(), ROWS_PER_DRAW):
        block = torch.randn(min(ROWS_PER_DRAW, flat.numel() - start), generator=g)
        flat[start : start + block.numel()] = block.mul_(scale).add_(offset)
    return out


_CORPUS = (
    "Open the settings app and turn on dark mode. Tap the search bar, type the name of the "
    "restaurant, then scroll down to the reviews. What is on the screen? Describe the buttons "
    "and the text you can see. The phone shows a chat with three messages and a keyboard. "
    "Click the blue button labelled Send. Swipe left to see the next photo. 0123456789 "
)


def build_tokenizer(vocab: int, full_vocab: bool) -> str:
    """A byte-level BPE tokenizer.json with GLM's special tokens at the config's ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    base = special_base(vocab, full_vocab)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bpe_size = min(base, 384)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False, min_frequency=1
    )
    tok.train_from_iterator([_CORPUS] * 8, trainer=trainer)
    data = json.loads(tok.to_str())
    size = len(data["model"]["vocab"])
    # fill up to the special-token base with reserved tokens so specials land on their ids
    added = [
        {
            "id": i,
            "content": f"<|filler_{i}|>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i in range(size, base)
    ]
    added += [
        {
            "id": base + k,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for k, s in enumerate(SPECIAL_TOKENS)
    ]
    data["added_tokens"] = added
    return json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True)


# GLM-4.1V-9B-Thinking's chat_template.jinja as published, with an audio branch for the checkpoints
# that have an audio tower (the published template has none; without one their clips had no place)
GLM41V_CHAT_TEMPLATE = (
    "[gMASK]<sop>\n{%- for msg in messages %}\n    {%- if msg.role == 'system' %}\n<|system|>\n{{ msg.content }}\n"
    "    {%- elif msg.role == 'user' %}\n<|user|>{{ '\\n' }}\n\n        {%- if msg.content is string %}\n{{ msg.content }}\n"
    "        {%- else %}\n            {%- for item in msg.content %}\n"
    "                {%- if item.type == 'video' or 'video' in item %}\n<|begin_of_video|><|video|><|end_of_video|>\n"
    "                {%- elif item.type == 'image' or 'image' in item %}\n<|begin_of_image|><|image|><|end_of_image|>\n"
    "@AUDIO@"
    "                {%- elif item.type == 'text' %}\n{{ item.text }}\n                {%- endif %}\n"
    "            {%- endfor %}\n        {%- endif %}\n    {%- elif msg.role == 'assistant' %}\n"
    "        {%- if msg.metadata %}\n<|assistant|>{{ msg.metadata }}\n{{ msg.content }}\n"
    "        {%- else %}\n<|assistant|>\n{{ msg.content }}\n        {%- endif %}\n    {%- endif %}\n"
    "{%- endfor %}\n{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_AUDIO_BRANCH = "                {%- elif item.type == 'audio' %}\n<|begin_of_audio|><|audio|><|end_of_audio|>\n"


def chat_template(audio: bool) -> str:
    return GLM41V_CHAT_TEMPLATE.replace("@AUDIO@", _AUDIO_BRANCH if audio else "")


# in the index's metadata: `tiny-checkpoint --force` replaces only a checkpoint it wrote itself
TINY_MARK = "autoglm_export_tiny_preset"


def is_tiny_checkpoint(path: Path) -> bool:
    try:
        index = json.loads((path / "model.safetensors.index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(index, dict) and isinstance(index.get("metadata"), dict) and TINY_MARK in index["metadata"]


def write_tiny_checkpoint(
    out: Path,
    *,
    seed: int = 0,
    preset: str = "tiny",
    layers: int | None = None,
    vision_depth: int | None = None,
    audio: bool = False,
    force: bool = False,
    progress=None,
    **overrides,
) -> Path:
    if preset not in PRESETS:
        raise ExportError("unknown preset", field="--preset", expected=" | ".join(PRESETS), got=preset)
    p = PRESETS[preset]
    if layers is not None:
        p = replace(p, layers=layers)
    if vision_depth is not None:
        p = replace(p, vision_depth=vision_depth)
    if overrides:
        p = replace(p, **overrides)
    config = make_config(p, audio=audio)
    base = special_base(p.vocab, p.full_vocab_tokenizer)
    gen = {
        "do_sample": False,
        "eos_token_id": [base + o for o in EOS_OFFSETS],
        "pad_token_id": base,
        "transformers_version": "5.23.0",
    }
    family = get_family("glm4v")
    spec = family.parse_config(config, Path(out) / "config.json", gen)
    shapes = family.full_layout(spec)

    with atomic_output_dir(
        Path(out), force=force, replaceable=is_tiny_checkpoint, what="a checkpoint this command wrote"
    ) as tmp:
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape in shapes.items():
            nbytes = math.prod(shape) * 2
            if shards[-1] and size + nbytes > p.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, shape, torch.bfloat16))
            size += nbytes
        weight_map, total = {}, 0
        for i, entries in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            total += write_safetensors(tmp / fname, entries, lambda n: random_tensor(n, shapes[n], seed))
            weight_map.update({n: fname for n, _, _ in entries})
            if progress:
                progress(f"wrote {fname} ({len(entries)} tensors)")
        index = {"metadata": {"total_size": total, TINY_MARK: preset}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(build_tokenizer(p.vocab, p.full_vocab_tokenizer))
        (tmp / "chat_template.jinja").write_text(chat_template(audio))
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "pad_token": "<|endoftext|>",
                    "eos_token": "<|endoftext|>",
                },
                indent=2,
            )
            + "\n"
        )
        pre = {
            "image_processor_type": "Glm4vImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": 12544, "longest_edge": 9633792},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "do_convert_rgb": True,
            "resample": 3,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
        }
        (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    return Path(out)
