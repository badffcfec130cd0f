"""Golden vectors for the app ports (Kotlin, Swift): prompt ids, pixels, positions.

Everything the apps must reproduce bit for bit (integers) or to 1e-5 (floats), computed by the
same host code the runner uses, from a deterministic synthetic image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .image import ImagePreprocessing, preprocess_image
from .positions import decode_positions, mrope_positions
from .prompt import build_chat_prompt

GOLDEN_PROMPT = "What is on the screen?"


def golden_image(width: int = 60, height: int = 40):
    """A deterministic RGB test card: gradients plus a block, not square (exercises resizing)."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255) // max(width - 1, 1), (y * 255) // max(height - 1, 1), ((x + y) * 7) % 256], -1)
    rgb[height // 4 : height // 2, width // 4 : width // 2] = (250, 20, 30)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def golden_audio(seconds: float = 2.0, rate: int = 16000) -> np.ndarray:
    """A deterministic 2 s test signal: a 300 -> 1200 Hz chirp plus a little seeded noise."""
    t = np.arange(int(seconds * rate)) / rate
    chirp = 0.4 * np.sin(2 * np.pi * (300 * t + 225 * t * t))
    return (chirp + 0.01 * np.random.default_rng(0).standard_normal(t.size)).astype(np.float32)


def golden_vectors(tokenizer, pre: ImagePreprocessing, decode_steps: int = 4, audio_pre=None) -> dict:
    """With ``audio_pre`` (an AudioPreprocessing) the prompt also carries the golden audio clip and
    the vectors include its waveform and log-mel frames."""
    img = golden_image()
    pixels = preprocess_image(img, pre)
    audio_tokens = audio_pre.frames // 8 if audio_pre is not None else None
    prompt = build_chat_prompt(tokenizer, GOLDEN_PROMPT, pre.num_tokens, audio_tokens)
    pos, delta = mrope_positions(prompt.types, [pre.merged_grid])
    n = len(prompt)
    out = {}
    if audio_pre is not None:
        from .audio import log_mel

        wave = golden_audio(rate=audio_pre.sample_rate)
        mel = log_mel(wave, audio_pre)
        out["audio"] = {"sample_rate": audio_pre.sample_rate, "waveform": [float(v) for v in wave],
                        "preprocessing": audio_pre.to_json(),
                        "log_mel": {"shape": list(mel.shape), "data": [float(v) for v in mel.reshape(-1)]}}  # fmt: skip
    return out | {
        "prompt_text": GOLDEN_PROMPT,
        "prompt_ids": prompt.ids,
        "token_types": prompt.types,
        "special_ids": tokenizer.special,
        "image": {"width": img.width, "height": img.height, "rgb": np.asarray(img).reshape(-1).tolist()},
        "preprocessing": pre.to_json(),
        "pixel_values": {"shape": list(pixels.shape), "data": [float(v) for v in pixels.reshape(-1)]},
        "positions": pos.tolist(),
        "rope_delta": delta,
        "decode_positions": [
            {"cache_index": n + i, "position": int(decode_positions(n + i, delta)[0, 0])} for i in range(decode_steps)
        ],
    }


def write_golden(path: Path, vectors: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(vectors, indent=1, sort_keys=True) + "\n")
