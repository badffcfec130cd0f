"""A bundle opened for running: its target's runtime on this host, the tokenizer and the image
preprocessing it was exported with (``run``, ``serve``, the golden vectors of the apps)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from .bundle import load_bundle
from .errors import BundleError, excerpt
from .host.image import ImagePreprocessing
from .host.tokenizer import ChatTokenizer
from .models.glm4v.spec import TokenSpec
from .targets import get_target, open_bundle_runtime


def open_bundle(bundle: Path, manifest: dict | None = None, trust_stamp: bool = False):
    if manifest is None:  # refuses a bundle whose files do not match their hashes
        manifest = load_bundle(bundle, trust_stamp=trust_stamp)
    tgt = get_target(manifest["target"])
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
        audio = SimpleNamespace(
            audio_token_id=sp["audio"], audio_start_token_id=sp["begin_of_audio"], audio_end_token_id=sp["end_of_audio"]
        )
    tokenizer = ChatTokenizer(Path(bundle) / "tokenizer.json", tokens, audio)
    pre = ImagePreprocessing.from_json(manifest["preprocessing"])
    return manifest, open_bundle_runtime(tgt, Path(bundle), manifest), tokenizer, pre


def check_verified(bundle: Path, manifest: dict, allow_failed: bool, warn: Callable[[str], object]) -> None:
    """A bundle whose parity gates failed at export is refused unless the user says otherwise."""
    verification = manifest.get("verification") if isinstance(manifest.get("verification"), dict) else {}
    if verification.get("passed") is False:
        failed = ", ".join(str(f) for f in verification.get("failed") or [])
        if not allow_failed:
            raise BundleError(
                "this bundle failed its parity gates at export",
                file=bundle / "manifest.json",
                field="verification.passed",
                got=excerpt(f"false ({failed})"),
                fix="re-export with another recipe, or pass --allow-failed to run it anyway",
            )
        warn(f"warning: running a bundle that failed its parity gates ({excerpt(failed)})")
