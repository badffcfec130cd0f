"""Write golden vectors for the app ports.

python scripts/make_golden.py --bundle BUNDLE OUT_DIR [--max-new-tokens N] [--conversation]
    host vectors + tokenizer cases + a recorded greedy trace from a bundle's runtime,
    with a copy of the bundle itself (what the Kotlin/Swift tests read); --conversation adds a
    recorded three-step agent conversation (prefix reuse, frequency penalty)
python scripts/make_golden.py CHECKPOINT OUT.json [--image-size S] [--audio-seconds A]
    host vectors only (prompt ids, pixels, positions, log-mel), from a checkpoint
"""

from __future__ import annotations

import argparse
from pathlib import Path

from autoglm_export.checkpoint import open_checkpoint
from autoglm_export.golden_bundle import golden_bundle
from autoglm_export.host.golden import golden_vectors, write_golden
from autoglm_export.host.image import ImagePreprocessing
from autoglm_export.fsutil import load_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a bundle (with --bundle) or a checkpoint directory")
    ap.add_argument("out", type=Path)
    ap.add_argument("--bundle", action="store_true", help="SOURCE is a bundle; OUT is a directory")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--conversation", action="store_true", help="with --bundle: also a recorded agent conversation")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--audio-seconds", type=float, default=3.2)
    a = ap.parse_args()
    if a.bundle:
        print(f"wrote {golden_bundle(a.source, a.out, a.max_new_tokens, a.conversation)}")
        return
    ckpt = open_checkpoint(a.source)
    pc_file = a.source / "preprocessor_config.json"
    pc = load_json(pc_file, "preprocessor_config.json", "") if pc_file.is_file() else {}
    v = ckpt.spec.vision
    pre = ImagePreprocessing.from_checkpoint(pc, a.image_size, v.patch_size, v.spatial_merge_size)
    audio_pre = None
    if ckpt.spec.audio is not None:
        from autoglm_export.host.audio import AudioPreprocessing

        audio_pre = AudioPreprocessing(frames=round(a.audio_seconds * 100), mel_bins=ckpt.spec.audio.num_mel_bins)
    write_golden(a.out, golden_vectors(ckpt.chat_tokenizer(), pre, audio_pre=audio_pre))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
