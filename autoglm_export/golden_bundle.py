"""Golden vectors of a bundle for the apps' tests: ``host.golden``'s host vectors plus a recorded
greedy run of the bundle's own runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .host.golden import (
    GOLDEN_PROMPT,
    TOKENIZER_CASES,
    RecordingRuntime,
    tensor_json,
    golden_audio,
    golden_image,
    golden_vectors,
    write_golden,
)
from .host.image import preprocess_image
from .host.prompt import build_chat_prompt


def golden_bundle(bundle: Path, out_dir: Path, max_new_tokens: int = 8) -> Path:
    """Golden vectors from a bundle: the host vectors, tokenizer cases and a recorded greedy trace of
    the golden image (+ golden audio when the bundle has an audio encoder) + prompt. Writes
    ``golden.json`` beside a copy of the bundle (manifest and every file it lists)."""
    import shutil

    from .host.audio import AudioPreprocessing, log_mel
    from .host.generate import generate
    from .opened_bundle import open_bundle

    manifest, runtime, tokenizer, pre = open_bundle(bundle)
    audio_pre = AudioPreprocessing(**manifest["audio_preprocessing"]) if manifest.get("audio_preprocessing") else None
    vectors = golden_vectors(tokenizer, pre, audio_pre=audio_pre)
    vectors["tokenizer_cases"] = [{"text": t, "ids": tokenizer.encode(t)} for t in TOKENIZER_CASES]
    audio_tokens = manifest["components"]["audio_encoder"]["outputs"][0]["shape"][0] if audio_pre else None
    prompt = build_chat_prompt(tokenizer, GOLDEN_PROMPT, pre.num_tokens, audio_tokens)
    assert prompt.ids == vectors["prompt_ids"]
    audios = [log_mel(golden_audio(rate=audio_pre.sample_rate), audio_pre)[None]] if audio_pre else []
    rec = RecordingRuntime(runtime)
    graph_calls: list[dict] = []
    if hasattr(runtime, "_run"):  # static-graph bundles (qnn, onnx-qnn: graph; coreml: package, function): every call
        inner = runtime._run

        def recorded(*args):
            *names, feeds = args
            out = inner(*args)
            outs = list(out.values()) if isinstance(out, dict) else out
            graph_calls.append(
                {
                    "graph": "/".join(names),
                    "inputs": {k: tensor_json(np.asarray(v)) for k, v in feeds.items()},
                    "outputs": [tensor_json(np.asarray(o)) for o in outs],
                }
            )
            return out

        runtime._run = recorded
    trace = generate(
        rec,
        prompt,
        images=[preprocess_image(golden_image(), pre, pre.sizes[0])],
        image_grids=[pre.merged_grid],
        audios=audios,
        max_new_tokens=max_new_tokens,
        eos_ids=tuple(manifest["prompt"]["eos_ids"]),
    )
    vectors["trace"] = {
        "max_new_tokens": max_new_tokens,
        "tokens": trace.tokens,
        "calls": rec.calls,
        "target": manifest["target"],
    }
    if graph_calls:
        vectors["trace"]["graph_calls"] = graph_calls
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_golden(out_dir / "golden.json", vectors)
    for name in ("manifest.json", *manifest["files"]):
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)  # files inside a .mlpackage
        shutil.copyfile(Path(bundle) / name, out_dir / name)
    return out_dir / "golden.json"
