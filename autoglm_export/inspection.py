"""``autoglm-export inspect``: what a checkpoint holds and what it will cost on a phone.

Works on a full checkpoint (headers only, no tensor data read) and on a config-only directory
(shapes derived from config.json), so a user can size a model before downloading its shards.
"""

from __future__ import annotations

import math
from pathlib import Path

from .checkpoint import INDEX_FILE, SINGLE_FILE, open_checkpoint
from .errors import CheckpointError
from .fsutil import load_json
from .models import family_for_config, family_of

# INT4 group-wise with one fp16 scale per 32 weights: 4 + 16/32 bits per weight
INT4_BITS = 4.5


def _estimate(component_shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    int4 = fp16 = 0
    for shape in component_shapes.values():
        n = math.prod(shape)
        fp16 += 2 * n
        int4 += n * INT4_BITS / 8 if len(shape) >= 2 else 2 * n
    return int(int4), int(fp16)


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def describe(path: str | Path) -> dict:
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(
            "checkpoint directory not found", file=root, fix="pass the directory that holds config.json"
        )
    has_weights = (root / INDEX_FILE).is_file() or (root / SINGLE_FILE).is_file()
    if has_weights:
        ckpt = open_checkpoint(root, require_tokenizer=False)
        spec, dtypes = ckpt.spec, {k: i.dtype for k, i in ckpt.tensors.items()}
    else:
        cfg_file = root / "config.json"
        config = load_json(cfg_file, "config.json", "pass a Hugging Face checkpoint directory that has config.json")
        gen_file = root / "generation_config.json"
        gen = (
            load_json(gen_file, "generation_config.json", "copy it from the original checkpoint")
            if gen_file.is_file()
            else None
        )
        spec, dtypes = family_for_config(config, cfg_file).parse_config(config, cfg_file, gen), {}
    components = {}
    total = int4_total = fp16_total = 0
    for comp in family_of(spec).components.for_spec(spec):
        shapes = comp.keys(spec)
        params = sum(math.prod(s) for s in shapes.values())
        int4, fp16 = _estimate(shapes)
        components[comp.name] = {
            "params": params,
            "tensors": len(shapes),
            "dtypes": sorted({dtypes[k] for k in shapes if k in dtypes}) or ["(config only)"],
            "int4_bytes_est": int4,
            "fp16_bytes_est": fp16,
        }
        total += params
        int4_total += int4
        fp16_total += fp16
    t, v = spec.text, spec.vision
    return {
        "checkpoint": str(root),
        "architecture": spec.architecture,
        "model_type": spec.model_type,
        "config_form": spec.config_form,
        "weights_present": has_weights,
        "text": {
            "layers": t.num_layers,
            "hidden": t.hidden_size,
            "heads": t.num_heads,
            "kv_heads": t.num_kv_heads,
            "head_dim": t.head_dim,
            "vocab": t.vocab_size,
            "mrope_section": list(t.mrope_section),
            "rotary_dim": t.rotary_dim,
        },
        "vision": {
            "depth": v.depth,
            "hidden": v.hidden_size,
            "heads": v.num_heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
        },
        "audio": None
        if spec.audio is None
        else {
            "layers": spec.audio.num_layers,
            "hidden": spec.audio.hidden_size,
            "heads": spec.audio.num_heads,
            "mel_bins": spec.audio.num_mel_bins,
        },
        "components": components,
        "total_params": total,
        "int4_bytes_est": int4_total,
        "fp16_bytes_est": fp16_total,
    }


def format_table(info: dict) -> str:
    lines = [
        f"checkpoint    {info['checkpoint']}",
        f"architecture  {info['architecture']} (config form: {info['config_form']}"
        + ("" if info["weights_present"] else ", config only: no weights present")
        + ")",
        f"text          {info['text']['layers']} layers, hidden {info['text']['hidden']}, "
        f"{info['text']['heads']}/{info['text']['kv_heads']} heads (head_dim {info['text']['head_dim']}), "
        f"vocab {info['text']['vocab']}, M-RoPE {info['text']['mrope_section']}",
        f"vision        {info['vision']['depth']} blocks, hidden {info['vision']['hidden']}, "
        f"image {info['vision']['image_size']}px, patch {info['vision']['patch_size']}",
        "audio         "
        + (
            f"{info['audio']['layers']} layers, hidden {info['audio']['hidden']}, {info['audio']['mel_bins']} mel bins"
            if info["audio"]
            else "none"
        ),
        "",
        f"{'component':<18}{'params':>16}  {'dtypes':<14}{'INT4 est.':>12}{'FP16 est.':>12}",
    ]
    for name, c in info["components"].items():
        lines.append(
            f"{name:<18}{c['params']:>16,}  {','.join(c['dtypes']):<14}"
            f"{human_bytes(c['int4_bytes_est']):>12}{human_bytes(c['fp16_bytes_est']):>12}"
        )
    lines.append(
        f"{'total':<18}{info['total_params']:>16,}  {'':<14}"
        f"{human_bytes(info['int4_bytes_est']):>12}{human_bytes(info['fp16_bytes_est']):>12}"
    )
    lines.append("INT4 estimate: 2-D weights at 4.5 bits (int4, group 32, fp16 scales), 1-D tensors fp16.")
    return "\n".join(lines)
