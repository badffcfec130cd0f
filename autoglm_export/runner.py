"""``autoglm-export run``: generate from a bundle with the same host logic as the apps."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .bundle import load_bundle
from .errors import ExportError
from .host.audio import AudioPreprocessing, load_audio
from .host.image import load_image
from .opened_bundle import check_verified


def parse_order(order: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in order.split(","))
    if sorted(parts) != ["audio", "image", "text"]:
        raise ExportError(
            "invalid part order",
            field="--order",
            expected="image, audio and text once each, e.g. audio,text,image",
            got=repr(order),
            fix="list the three parts separated by commas",
        )
    return parts


def read_prompt(prompt: str | None, prompt_file: str | Path | None, stdin=None) -> str:
    """The user text from --prompt, or --prompt-file (a path, or '-' for standard input: no argv limit)."""
    import sys

    if (prompt is None) == (prompt_file is None):
        raise ExportError(
            "give the prompt once",
            field="--prompt / --prompt-file",
            expected="exactly one of them",
            fix="pass --prompt TEXT, or --prompt-file FILE (- reads standard input)",
        )
    if prompt is not None:
        return prompt
    if str(prompt_file) == "-":
        data = (stdin or sys.stdin.buffer).read(MAX_PROMPT_BYTES + 1)
        where: str | Path = "standard input"
    else:
        p = Path(prompt_file)
        if not p.is_file():
            raise ExportError(
                "prompt file not found", file=p, field="--prompt-file", fix="pass an existing UTF-8 text file"
            )
        with open(p, "rb") as f:
            data = f.read(MAX_PROMPT_BYTES + 1)
        where = p
    if len(data) > MAX_PROMPT_BYTES:
        raise ExportError(
            "prompt too long",
            file=where,
            expected=f"at most {MAX_PROMPT_BYTES:,} bytes",
            fix="shorten the prompt; the bundle's max_context bounds it anyway",
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExportError(
            "prompt is not UTF-8 text", file=where, got=f"byte {e.start}", fix="save the prompt as UTF-8"
        ) from None


MAX_PROMPT_BYTES = 16 << 20


def run_bundle(
    bundle: str | Path,
    *,
    prompt: str,
    image: str | Path | None,
    max_new_tokens: int,
    write: Callable[[str], object],
    audio: str | Path | None = None,
    order: str = "image,audio,text",
    allow_failed: bool = False,
    warn: Callable[[str], object] = lambda s: None,
    system: str | None = None,
) -> list[int]:
    """One user turn (and an optional system prompt) through the conversation runtime ``serve`` uses."""
    from .chat_engine import ChatEngine
    from .host.messages import Message, Part

    bundle = Path(bundle)
    parts = parse_order(order)
    # user inputs are read, and refused, before any runtime library loads (libsndfile also
    # crashes when it first opens a file after onnxruntime-qnn's libraries are in the process)
    img = load_image(image) if image is not None else None
    manifest = load_bundle(bundle, trust_stamp=True)  # hashed in full once; `verify` always re-hashes
    check_verified(bundle, manifest, allow_failed, warn)
    wave = None
    if audio is not None:
        if not manifest.get("audio_preprocessing"):
            raise ExportError(
                "this bundle has no audio encoder",
                field="--audio",
                file=bundle,
                fix="export a checkpoint with an audio tower, or drop --audio",
            )
        wave = load_audio(audio, AudioPreprocessing(**manifest["audio_preprocessing"]))
    engine = ChatEngine(bundle, manifest=manifest)
    user = []
    for part in parts:
        if part == "image" and img is not None:
            user.append(engine.image_part(img))
        elif part == "audio" and wave is not None:
            user.append(engine.audio_part(wave))
        elif part == "text":
            user.append(Part.of_text(prompt))
    messages = ([Message.text("system", system)] if system else []) + [Message("user", tuple(user))]
    return engine.chat(messages, max_tokens=max_new_tokens, on_text=write).tokens
