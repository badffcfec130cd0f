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
from .conversation import build_chat_prompt

GOLDEN_PROMPT = "What is on the screen?"


def golden_image(width: int = 60, height: int = 40):
    """A deterministic RGB test card: gradients plus a block, not square (exercises resizing)."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255) // max(width - 1, 1), (y * 255) // max(height - 1, 1), ((x + y) * 7) % 256], -1)
    rgb[height // 4 : height // 2, width // 4 : width // 2] = (250, 20, 30)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def golden_screen_image(pre: ImagePreprocessing, width: int = 45, height: int = 100) -> dict:
    """A portrait phone-screen-shaped test card, the image bucket it goes to and its pixels there:
    an app picks the same bucket and feeds the same pixels to the same method."""
    img = golden_image(width, height)
    x = pre.prepare(img)
    return {
        "width": width,
        "height": height,
        "rgb": np.asarray(img).reshape(-1).tolist(),
        "method": x.method,
        "grid": list(x.grid),
        "pixel_values": {"shape": list(x.pixels.shape), "data": [float(v) for v in x.pixels.reshape(-1)]},
    }


def golden_transparent_image(width: int = 16, height: int = 8) -> dict:
    """Pixels with every alpha level, as ARGB ints (Android's Bitmap.getPixels), and the RGB the host
    gives them (``to_rgb``: composited on white, as transformers' image processors do)."""
    from PIL import Image

    from .image import to_rgb

    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    rgba[..., 3] = np.arange(width * height, dtype=np.uint32).reshape(height, width) * 255 // (width * height - 1)
    a, r, g, b = (rgba[..., i].astype(np.uint32) for i in (3, 0, 1, 2))
    argb = ((a << 24) | (r << 16) | (g << 8) | b).astype(np.uint32).view(np.int32)  # Java ints are signed
    rgb = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    return {"width": width, "height": height, "argb": argb.reshape(-1).tolist(), "rgb": rgb.reshape(-1).tolist()}


def golden_audio(seconds: float = 2.0, rate: int = 16000) -> np.ndarray:
    """A deterministic 2 s test signal: a 300 -> 1200 Hz chirp plus a little seeded noise."""
    t = np.arange(int(seconds * rate)) / rate
    chirp = 0.4 * np.sin(2 * np.pi * (300 * t + 225 * t * t))
    return (chirp + 0.01 * np.random.default_rng(0).standard_normal(t.size)).astype(np.float32)


def golden_vectors(tokenizer, pre: ImagePreprocessing, decode_steps: int = 4, audio_pre=None) -> dict:
    """With ``audio_pre`` (an AudioPreprocessing) the prompt also carries the golden audio clip and
    the vectors include its waveform and log-mel frames."""
    img = golden_image()
    pixels = preprocess_image(img, pre, pre.sizes[0])  # the apps encode with vision_encoder, the first bucket
    audio_tokens = audio_pre.frames // 8 if audio_pre is not None else None
    prompt = build_chat_prompt(tokenizer, GOLDEN_PROMPT, pre.num_tokens, audio_tokens)
    pos, delta = mrope_positions(prompt.types, [pre.merged_grid])
    n = len(prompt)
    out = {}
    if audio_pre is not None:
        from .audio import log_mel

        wave = golden_audio(rate=audio_pre.sample_rate)
        mel = log_mel(wave, audio_pre)
        out["audio"] = {
            "sample_rate": audio_pre.sample_rate,
            "waveform": [float(v) for v in wave],
            "preprocessing": audio_pre.to_json(),
            "log_mel": {"shape": list(mel.shape), "data": [float(v) for v in mel.reshape(-1)]},
        }
    return out | {
        "prompt_text": GOLDEN_PROMPT,
        "prompt_ids": prompt.ids,
        "token_types": prompt.types,
        "special_ids": tokenizer.special,
        "image": {"width": img.width, "height": img.height, "rgb": np.asarray(img).reshape(-1).tolist()},
        "transparent_image": golden_transparent_image(),
        "screen_image": golden_screen_image(pre),
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


TOKENIZER_CASES = (
    GOLDEN_PROMPT,
    "\n",
    "Tap the blue 'Send' button, then type 12345!",
    "  two  spaces,\ttabs\tand\n\nnew lines  ",
    "ünïcödé, 中文 and an emoji 🙂",
    "they're here <|user|> not a turn",
)


class RecordingRuntime:
    """Wraps a bundle runtime and logs every call (inputs and outputs) in order: the replay
    script the app ports' generation loops must reproduce call for call."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.max_context = inner.max_context
        self.prefill_chunk = inner.prefill_chunk
        self.calls: list[dict] = []

    def _log(self, method: str, inputs: dict, out):
        enc = {k: tensor_json(v) for k, v in inputs.items()}
        self.calls.append({"method": method, "inputs": enc, "output": tensor_json(out)})
        return out

    def token_embedding(self, input_ids):
        return self._log("token_embedding", {"input_ids": input_ids}, self.inner.token_embedding(input_ids))

    def vision_encoder(self, pixel_values, method: str = "vision_encoder"):
        return self._log(method, {"pixel_values": pixel_values}, self.inner.vision_encoder(pixel_values, method))

    def audio_encoder(self, input_features):
        return self._log("audio_encoder", {"input_features": input_features}, self.inner.audio_encoder(input_features))

    def text_decoder(self, embeds, position_ids, cache_position):
        out = self.inner.text_decoder(embeds, position_ids, cache_position)
        inputs = {"inputs_embeds": embeds, "position_ids": position_ids, "cache_position": cache_position}
        return self._log("text_decoder", inputs, out)

    def reset(self) -> None:
        self.calls.append({"method": "reset"})
        self.inner.reset()


def tensor_json(t) -> dict:
    a = np.asarray(t.detach().numpy() if hasattr(t, "detach") else t)
    kind = "int64" if a.dtype.kind in "iu" else "float32"
    data = [int(v) for v in a.reshape(-1)] if kind == "int64" else [float(v) for v in a.astype(np.float32).reshape(-1)]
    return {"dtype": kind, "shape": list(a.shape), "data": data}
