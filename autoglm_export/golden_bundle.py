"""Golden vectors of a bundle for the apps' tests: ``host.golden``'s host vectors plus a recorded
greedy run of the bundle's own runtime, and optionally a recorded multi-turn agent conversation."""

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
from .host.conversation import build_chat_prompt


def golden_bundle(bundle: Path, out_dir: Path, max_new_tokens: int = 8, conversation: bool = False) -> Path:
    """Golden vectors from a bundle: the host vectors, tokenizer cases and a recorded greedy trace of
    the golden image (+ golden audio when the bundle has an audio encoder) + prompt. Writes
    ``golden.json`` beside a copy of the bundle (manifest and every file it lists). ``conversation``:
    also an agent conversation through ``ChatEngine`` (``golden_conversation``)."""
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
    if conversation:
        vectors["conversation"] = golden_conversation(bundle)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_golden(out_dir / "golden.json", vectors)
    for name in ("manifest.json", *manifest["files"]):
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)  # files inside a .mlpackage
        shutil.copyfile(Path(bundle) / name, out_dir / name)
    return out_dir / "golden.json"


AGENT_SYSTEM = "You are a phone agent."  # short: the tiny bundles have a 128-token context
AGENT_TASKS = ("Open the settings app.", "Turn on Wi-Fi.", "Go back to the home screen.")
AGENT_MAX_TOKENS = 6
AGENT_FREQUENCY_PENALTY = 2.0


def golden_conversation(bundle: Path) -> dict:
    """A phone agent's loop through ``ChatEngine`` (what ``serve`` runs), recorded call by call: a
    system prompt, then per step a user turn with a new portrait screenshot and the task, the
    earlier screenshots dropped from the history and the earlier answers kept as assistant turns;
    the agent's sampling (temperature 0, a frequency penalty). Each turn's prompt ids, how many of
    them the cache already held (prefix reuse), the answer and the runtime calls it made."""
    from .chat_engine import ChatEngine
    from .host.golden import golden_image
    from .host.messages import Message, Part
    from .host.sampling import SamplingParams

    engine = ChatEngine(bundle, allow_failed=True)
    rec = RecordingRuntime(engine.runtime)
    engine.runtime = rec
    # the agent asks for 0.2; the tiny model's logits are so peaked that 0.2 changes no choice here,
    # so the vectors use a penalty that does (tests/test_app_ports.py checks that it did)
    sampling = SamplingParams(temperature=0.0, top_p=0.85, frequency_penalty=AGENT_FREQUENCY_PENALTY)
    system = Message.text("system", AGENT_SYSTEM)
    history: list[Message] = []
    turns = []
    for i, task in enumerate(AGENT_TASKS):
        screen = golden_image(45 + 2 * i, 100)  # portrait, a different screen each step
        user = Message("user", (engine.image_part(screen), Part.of_text(task)))
        messages = [system, *history, user]
        start = len(rec.calls)
        result = engine.chat(messages, max_tokens=AGENT_MAX_TOKENS, sampling=sampling)
        turns.append(
            {
                "task": task,
                "screen": {
                    "width": screen.width,
                    "height": screen.height,
                    "rgb": np.asarray(screen).reshape(-1).tolist(),
                },
                "prompt_ids": engine.render(messages).prompt.ids,
                "reused_tokens": result.reused_tokens,
                "tokens": result.tokens,
                "finish_reason": result.finish_reason,
                "text": result.text,
                "calls": rec.calls[start:],
            }
        )
        history += [Message.text("user", task), Message.text("assistant", result.text)]  # the screenshot dropped
    return {
        "system": AGENT_SYSTEM,
        "max_tokens": AGENT_MAX_TOKENS,
        "frequency_penalty": sampling.frequency_penalty,
        "presence_penalty": sampling.presence_penalty,
        "turns": turns,
    }
