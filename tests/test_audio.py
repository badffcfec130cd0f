"""Optional audio tower: schema, log-mel front end, encoder parity, prompt/positions, both targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autoglm_export.host.audio import AudioPreprocessing, load_audio, log_mel
from autoglm_export.host.positions import mrope_positions
from autoglm_export.host.conversation import build_chat_prompt
from autoglm_export.host.prompt import AUDIO, IMAGE, TEXT
from conftest import REPO, one_bucket_recipe, run_cli


@pytest.mark.parametrize("signal", ["tone", "noise"])
def test_log_mel_matches_whisper_feature_extractor(signal):
    from transformers import WhisperFeatureExtractor

    cfg = AudioPreprocessing(frames=320)
    t = np.arange(int(2.5 * 16000)) / 16000
    wave = (
        0.5 * np.sin(2 * np.pi * 440 * t)
        if signal == "tone"
        else 0.1 * np.random.default_rng(0).standard_normal(t.size)
    )
    wave = wave.astype(np.float32)
    ref = WhisperFeatureExtractor(feature_size=128)(
        wave, sampling_rate=16000, padding="max_length", max_length=cfg.samples, return_tensors="np"
    )["input_features"][0]
    ours = log_mel(wave, cfg)
    assert ours.shape == ref.shape == (128, 320)
    assert np.abs(ours - ref).max() <= 1e-3


def test_audio_encoder_matches_glmasr(audio_ckpt):
    from transformers import GlmAsrConfig, GlmAsrEncoderConfig
    from transformers.models.glmasr.modeling_glmasr import GlmAsrEncoder, GlmAsrMultiModalProjector

    from reference import load_ours
    from autoglm_export.components import Shapes

    ckpt, mods = load_ours(audio_ckpt, Shapes(image_size=56, max_context=128, prefill_chunk=16, audio_seconds=3.2))
    cfg = json.loads((audio_ckpt / "config.json").read_text())["audio_config"]
    enc_cfg = GlmAsrEncoderConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    enc = GlmAsrEncoder(enc_cfg).eval()
    enc.load_state_dict(
        {
            k.removeprefix("model.audio_tower."): ckpt.tensor(k, torch.float32)
            for k in ckpt.tensors
            if k.startswith("model.audio_tower.")
        },
        strict=True,
    )
    proj = GlmAsrMultiModalProjector(
        GlmAsrConfig(audio_config=enc_cfg.to_dict(), text_config={"hidden_size": 64})
    ).eval()
    proj.load_state_dict(
        {
            k.removeprefix("model.multi_modal_projector."): ckpt.tensor(k, torch.float32)
            for k in ckpt.tensors
            if k.startswith("model.multi_modal_projector.")
        },
        strict=True,
    )
    from autoglm_export.host.golden import golden_audio

    feats = torch.from_numpy(log_mel(golden_audio(), AudioPreprocessing(frames=320))[None])
    with torch.no_grad():
        ref = proj(enc(feats).last_hidden_state.reshape(1, -1, enc_cfg.intermediate_size))[0]
        ours = mods["audio_encoder"](feats)
    assert ours.shape == (40, 64)
    assert (ref - ours).abs().max().item() <= 1e-4


def test_schema_inspect_and_bad_audio_config(audio_ckpt, tmp_path):
    proc = run_cli("inspect", audio_ckpt, "--json")
    info = json.loads(proc.stdout)
    assert info["components"]["audio_encoder"]["params"] > 0 and info["audio"]["mel_bins"] == 128
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(audio_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["audio_config"]["intermediate_size"] = 100
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("inspect", bad)
    assert proc.returncode == 2 and "audio_config.intermediate_size" in proc.stderr and "Traceback" not in proc.stderr


def test_audio_prompt_and_positions(audio_ckpt):
    from autoglm_export.checkpoint import open_checkpoint

    tok = open_checkpoint(audio_ckpt).chat_tokenizer()
    p = build_chat_prompt(tok, "hi", image_tokens=4, audio_tokens=3, order=("audio", "text", "image"))
    text = tok.tok.decode(p.ids, skip_special_tokens=False)
    assert text.startswith("[gMASK]<sop><|user|>\n<|begin_of_audio|><|audio|><|audio|><|audio|><|end_of_audio|>hi")
    assert text.endswith("<|begin_of_image|>" + "<|image|>" * 4 + "<|end_of_image|><|assistant|>\n")
    # audio advances like text; the 2x2 image takes max(gh, gw) = 2 positions for 4 tokens
    types = [TEXT] * 2 + [AUDIO] * 3 + [TEXT] + [IMAGE] * 4 + [TEXT]
    pos, delta = mrope_positions(types, [(2, 2)])
    assert pos[:, :6].tolist() == [list(range(6))] * 3
    assert pos[:, 6:10].tolist() == [[6, 6, 6, 6], [6, 6, 7, 7], [6, 7, 6, 7]]
    assert pos[:, 10].tolist() == [8, 8, 8] and delta == 9 - 11


def test_load_audio_resamples_and_refuses_bad_input(tmp_path):
    import soundfile as sf

    from autoglm_export.errors import ExportError

    cfg = AudioPreprocessing(frames=320)
    t = np.arange(44100) / 44100
    sf.write(tmp_path / "a.flac", (0.3 * np.sin(2 * np.pi * 500 * t)).astype(np.float32), 44100)
    wave = load_audio(tmp_path / "a.flac", cfg)
    assert abs(len(wave) - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 500) < 2  # the tone survives resampling
    sf.write(tmp_path / "silent.wav", np.zeros(1600, np.float32), 16000)
    sf.write(tmp_path / "long.wav", np.ones(16000 * 4, np.float32) * 0.1, 16000)
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    for name, needle in (
        ("silent.wav", "empty or silent"),
        ("long.wav", "longer than"),
        ("junk.wav", "cannot read"),
        ("missing.wav", "not found"),
    ):
        with pytest.raises(ExportError, match=needle):
            load_audio(tmp_path / name, cfg)


def test_golden_vectors_carry_log_mel(audio_ckpt, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "g.json"
    subprocess.run(
        [sys.executable, str(REPO / "scripts/make_golden.py"), str(audio_ckpt), str(out)],
        check=True,
        capture_output=True,
    )
    g = json.loads(out.read_text())
    assert g["audio"]["log_mel"]["shape"] == [128, 320]
    assert g["token_types"].count(AUDIO) == 40
    mel = np.asarray(g["audio"]["log_mel"]["data"], np.float32).reshape(128, 320)
    assert np.array_equal(mel, log_mel(np.asarray(g["audio"]["waveform"], np.float32), AudioPreprocessing(frames=320)))


@pytest.mark.parametrize("target", ["xnnpack", "onnx", "onnx-qnn", "qnn"])
def test_audio_bundle_end_to_end(target, audio_ckpt, tmp_path, request):
    """image + audio + text: component gates and 32-token greedy agreement, then run --audio."""
    import soundfile as sf

    from autoglm_export.host.golden import golden_audio

    if target == "xnnpack":
        out = request.getfixturevalue("audio_xnnpack_bundle")  # shared with the app-port tests
    elif target == "qnn":  # shared with the weight-sharing test: verified on its unshared twin
        out = request.getfixturevalue("qnn_shared_audio_bundle")[0]
    else:
        out = tmp_path / "bundle"
        recipe = one_bucket_recipe(REPO / "recipes" / f"{target}-tiny.yaml", tmp_path / f"{target}-tiny.yaml")
        proc = run_cli("-q", "--target", target, "--checkpoint", audio_ckpt, "--out", out, "--recipe", recipe)
        assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    audio = checks["audio_encoder/lowered_vs_reference"]
    # the recipes' audio precision: fp16 on every target (fp16 gate against the fp32 reference)
    want = {"xnnpack": ("fp16", 40), "onnx": ("fp16", 40), "onnx-qnn": ("fp16", 40), "qnn": ("fp16", 40)}[target]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["audio_encoder"]["quantization"]["float_dtype"] == want[0]
    assert audio["threshold_db"] == want[1] and (audio["bit_exact"] or audio["sqnr_db"] >= want[1])
    e2e = checks["end_to_end/greedy_lowered_vs_reference"]
    # qnn reports its greedy agreement (recipe: null gate): a 0.004 logit near-tie of this random model
    # flips under the HTP's fp16 audio encoder; every other target gates 32/32
    assert e2e["tokens"] == 32 and (e2e["agreement"] == 1.0 if target != "qnn" else e2e["gated"] is False)
    assert manifest["components"]["audio_encoder"]["inputs"][0]["shape"] == [1, 128, 320]
    if target == "xnnpack":  # its decoder in parts of one layer (conftest): the gates above ran through the chain
        parts = manifest["components"]["text_decoder"]["programs"]
        assert [p["layers"] for p in parts] == [[0, 1], [1, 2]] and all(p["file"] in manifest["files"] for p in parts)
    assert manifest["audio_preprocessing"]["frames"] == 320
    if target == "qnn":  # the emulator cannot load its shared-weight contexts: `run` on qnn is tested on the fixture
        return
    sf.write(tmp_path / "clip.wav", golden_audio(), 16000)
    proc = run_cli(
        "run",
        out,
        "--prompt",
        "What is said?",
        "--audio",
        tmp_path / "clip.wav",
        "--image",
        REPO / "tests/data/screen.png",
        "--order",
        "audio,text,image",
        "--max-new-tokens",
        "4",
    )
    # a random model may answer with EOS straight away: the text can be empty, the run must succeed
    assert proc.returncode == 0 and proc.stdout.endswith("\n") and "error:" not in proc.stderr, proc.stderr[-2000:]
    if target == "xnnpack":  # the independent-runtime gate CI runs for the ExecuTorch bundles: every method
        proc = run_cli("verify", out, "--against", "onnxruntime")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("onnxruntime/")}
        methods = set(manifest["components"])  # two image buckets, audio, token embedding, decoder (in parts)
        assert len(methods) == 5 and {
            f"onnxruntime/{m}_vs_{s}" for m in methods for s in ("bundle", "reference")
        } < set(lines)
        assert len(lines) == 11 and all(line.rstrip().endswith("PASS") for line in lines.values())  # 5 x 2 + greedy
        assert "100.0% of 32 tokens agree" in lines["onnxruntime/greedy_vs_bundle"]
