"""``autoglm-export run``: generate from a bundle with the same host logic as the apps."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from types import SimpleNamespace

from .bundle import load_bundle
from .errors import BundleError, ExportError, excerpt
from .host.audio import AudioPreprocessing, load_audio
from .host.image import ImagePreprocessing, load_image
from .host.tokenizer import ChatTokenizer
from .models.glm4v.spec import TokenSpec


def open_bundle(bundle: Path, manifest: dict | None = None, trust_stamp: bool = False):
    from .lower import get_backend, open_bundle_runtime

    if manifest is None:  # refuses a bundle whose files do not match their hashes
        manifest = load_bundle(bundle, trust_stamp=trust_stamp)
    backend = get_backend(manifest["target"])
    p = manifest["prompt"]
    tokens = TokenSpec(
        image_token_id=p["special_ids"]["image"],
        image_start_token_id=p["special_ids"]["begin_of_image"],
        image_end_token_id=p["special_ids"]["end_of_image"],
        video_token_id=p["special_ids"].get("video", -1),
        pad_token_id=p.get("pad_id"),
        eos_token_ids=tuple(p["eos_ids"]),
    )
    sp = p["special_ids"]
    audio = None
    if manifest.get("audio_preprocessing"):
        audio = SimpleNamespace(audio_token_id=sp["audio"], audio_start_token_id=sp["begin_of_audio"],
                                audio_end_token_id=sp["end_of_audio"])  # fmt: skip
    tokenizer = ChatTokenizer(Path(bundle) / "tokenizer.json", tokens, audio)
    pre = ImagePreprocessing.from_json(manifest["preprocessing"])
    return manifest, open_bundle_runtime(backend, Path(bundle), manifest), tokenizer, pre


def parse_order(order: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in order.split(","))
    if sorted(parts) != ["audio", "image", "text"]:
        raise ExportError("invalid part order", field="--order", expected="image, audio and text once each, e.g. audio,text,image",
                          got=repr(order), fix="list the three parts separated by commas")  # fmt: skip
    return parts


def check_verified(bundle: Path, manifest: dict, allow_failed: bool, warn: Callable[[str], object]) -> None:
    """A bundle whose parity gates failed at export is refused unless the user says otherwise."""
    verification = manifest.get("verification") if isinstance(manifest.get("verification"), dict) else {}
    if verification.get("passed") is False:
        failed = ", ".join(str(f) for f in verification.get("failed") or [])
        if not allow_failed:
            raise BundleError("this bundle failed its parity gates at export", file=bundle / "manifest.json",
                              field="verification.passed", got=excerpt(f"false ({failed})"),
                              fix="re-export with another recipe, or pass --allow-failed to run it anyway")  # fmt: skip
        warn(f"warning: running a bundle that failed its parity gates ({excerpt(failed)})")


def read_prompt(prompt: str | None, prompt_file: str | Path | None, stdin=None) -> str:
    """The user text from --prompt, or --prompt-file (a path, or '-' for standard input: no argv limit)."""
    import sys

    if (prompt is None) == (prompt_file is None):
        raise ExportError("give the prompt once", field="--prompt / --prompt-file", expected="exactly one of them",
                          fix="pass --prompt TEXT, or --prompt-file FILE (- reads standard input)")  # fmt: skip
    if prompt is not None:
        return prompt
    if str(prompt_file) == "-":
        data = (stdin or sys.stdin.buffer).read(MAX_PROMPT_BYTES + 1)
        where: str | Path = "standard input"
    else:
        p = Path(prompt_file)
        if not p.is_file():
            raise ExportError("prompt file not found", file=p, field="--prompt-file", fix="pass an existing UTF-8 text file")
        with open(p, "rb") as f:
            data = f.read(MAX_PROMPT_BYTES + 1)
        where = p
    if len(data) > MAX_PROMPT_BYTES:
        raise ExportError("prompt too long", file=where, expected=f"at most {MAX_PROMPT_BYTES:,} bytes",
                          fix="shorten the prompt; the bundle's max_context bounds it anyway")  # fmt: skip
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExportError("prompt is not UTF-8 text", file=where, got=f"byte {e.start}", fix="save the prompt as UTF-8") from None


MAX_PROMPT_BYTES = 16 << 20


def run_bundle(bundle: str | Path, *, prompt: str, image: str | Path | None, max_new_tokens: int,
               write: Callable[[str], object], audio: str | Path | None = None, order: str = "image,audio,text",
               allow_failed: bool = False, warn: Callable[[str], object] = lambda s: None,
               system: str | None = None) -> list[int]:  # fmt: skip
    """One user turn (and an optional system prompt) through the conversation runtime ``serve`` uses."""
    from .host.conversation import ChatEngine, Message, Part

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
            raise ExportError("this bundle has no audio encoder", field="--audio", file=bundle,
                              fix="export a checkpoint with an audio tower, or drop --audio")  # fmt: skip
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
