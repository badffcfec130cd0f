"""``autoglm-export run``: generate from a bundle with the same host logic as the apps."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .bundle import load_bundle
from .host.generate import generate
from .host.image import ImagePreprocessing, load_image, preprocess_image
from .host.prompt import build_chat_prompt
from .host.tokenizer import ChatTokenizer
from .models.glm4v.spec import TokenSpec


def open_bundle(bundle: Path):
    from .lower import get_backend

    manifest = load_bundle(bundle)  # refuses a bundle whose files do not match their hashes
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
    tokenizer = ChatTokenizer(Path(bundle) / "tokenizer.json", tokens)
    pre = ImagePreprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["preprocessing"].items()})
    return manifest, backend.open_runtime(Path(bundle), manifest), tokenizer, pre


def run_bundle(bundle: str | Path, *, prompt: str, image: str | Path | None, max_new_tokens: int,
               write: Callable[[str], object]) -> list[int]:  # fmt: skip
    bundle = Path(bundle)
    img = load_image(image) if image is not None else None  # fail on a bad image before loading the model
    manifest, runtime, tokenizer, pre = open_bundle(bundle)
    chat = build_chat_prompt(tokenizer, prompt, pre.num_tokens if img is not None else None)
    images = [preprocess_image(img, pre)] if img is not None else []
    generated: list[int] = []
    shown = ""
    eos = tuple(manifest["prompt"]["eos_ids"])

    def on_token(tok: int) -> None:
        nonlocal shown
        if tok in eos:
            return
        generated.append(tok)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            write(text[len(shown):])
            shown = text

    max_new = min(max_new_tokens, runtime.max_context - len(chat))
    generate(runtime, chat, images=images, image_grids=[pre.merged_grid] * len(images), max_new_tokens=max(max_new, 1),
             eos_ids=eos, on_token=on_token)  # fmt: skip
    return generated
