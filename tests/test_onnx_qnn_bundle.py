"""--target onnx-qnn on the tiny checkpoint: QDQ models, QNN context binaries for SM8650 / v75,
every node on the HTP, emulator vs the same QDQ models on ORT's CPU provider."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, run_cli

RECIPE = REPO / "recipes" / "onnx-qnn-tiny.yaml"


@pytest.fixture(scope="module")
def bundle(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("oqnn") / "bundle"
    proc = run_cli("--target", "onnx-qnn", "--checkpoint", tiny_ckpt, "--out", out, "--recipe", RECIPE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def _checks(out):
    return {c["name"]: c for c in json.loads((out / "report.json").read_text())["checks"]}


def test_gates_graphs_and_manifest(bundle):
    out, proc = bundle
    m = json.loads((out / "manifest.json").read_text())
    assert m["qnn"]["soc"] == "SM8650" and m["qnn"]["soc_model"] == 57 and m["qnn"]["htp_arch"] == 75
    assert m["qnn"]["qnn_sdk"].startswith("2.51") and "emulator" in m["qnn"]["emulator_note"]
    c = _checks(out)
    graphs = {g: spec for comp in m["components"].values() for g, spec in comp["graphs"].items()}
    assert set(graphs) == {
        "vision_encoder",
        "vision_encoder_224x112",
        "token_embedding_prefill",
        "token_embedding_decode",
        "text_decoder_prefill",
        "text_decoder_decode",
    }
    assert graphs["text_decoder_prefill"]["tokens"] == 16 and graphs["text_decoder_decode"]["tokens"] == 1
    assert (
        graphs["text_decoder_decode"]["precision"] == "16a4w/16a8w"
        and len(graphs["text_decoder_decode"]["int4_weights"]) == 12
    )
    for g, spec in graphs.items():
        nodes = c[f"qnn/{g}/all_nodes_on_htp"]
        assert nodes["passed"] and nodes["nodes_on_qnn"] > 0 and nodes["nodes_elsewhere"] == {}
        assert c[f"qnn/{g}/context_reload"]["passed"]
        for b in spec["binaries"]:  # compiled for the phone's SoC, not the emulator's default
            assert b"soc_type=SM8650;arch=75" in (out / b).read_bytes()
    for name in ("vision_encoder", "token_embedding", "text_decoder"):
        chk = c[f"{name}/lowered_vs_reference"]
        assert chk["threshold_db"] == 30 and chk["passed"] and (chk["bit_exact"] or chk["sqnr_db"] >= 30)
        assert c[f"{name}/reference_vs_fp32"]["gated"] is False  # the quantization cost is reported
    e2e = c["end_to_end/greedy_lowered_vs_reference"]
    assert e2e["tokens"] == 32 and e2e["agreement"] == 1.0
    assert "overall: PASS" in proc.stdout


def test_deterministic_and_run(bundle, tiny_ckpt, tmp_path):
    out, _ = bundle
    again = tmp_path / "again"
    proc = run_cli("-q", "--target", "onnx-qnn", "--checkpoint", tiny_ckpt, "--out", again, "--recipe", RECIPE)
    assert proc.returncode == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert first == {p.name: p.read_bytes() for p in again.iterdir()}  # QDQ graphs: byte-identical binaries too
    proc = run_cli(
        "run",
        out,
        "--prompt",
        "What is on the screen?",
        "--image",
        REPO / "tests/data/screen.png",
        "--max-new-tokens",
        "4",
    )
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]


def test_verify_against_onnxruntime(bundle):
    """The parity gate on an onnx-qnn bundle re-runs the emulator checks: nodes, SoC, reload, SQNR."""
    out, _ = bundle
    proc = run_cli("verify", out, "--against", "onnxruntime")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "qnn/text_decoder_decode/all_nodes_on_htp" in proc.stdout and "onnxruntime/gate" in proc.stdout
    assert "overall: PASS" in proc.stdout


def test_static_decoder_matches_stateful_decoder(tiny_ckpt):
    """TextDecoderStatic (host cos/sin/mask/cache) equals TextDecoder across chunks and decode steps."""
    from reference import load_ours

    from autoglm_export.components import Shapes
    from autoglm_export.models.glm4v.decoder_forms import TextDecoderStatic

    _, mods = load_ours(tiny_ckpt, Shapes(image_size=56, max_context=64, prefill_chunk=8))
    dec = mods["text_decoder"]
    st = TextDecoderStatic(dec).eval()
    t = dec.t
    caches = [torch.zeros(1, t.num_kv_heads, 64, t.head_dim) for _ in range(2 * t.num_layers)]
    emb = torch.randn(1, 20, t.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(20).unsqueeze(0).expand(3, 20).clone()
    pos[1, 5:9] += 1  # an image-like run: h/w axes differ from t
    dec.reset_cache()
    with torch.no_grad():
        for a, b in ((0, 8), (8, 16), (16, 17), (17, 18), (18, 20)):
            ref = dec(emb[:, a:b], pos[:, a:b], torch.arange(a, b))
            out = st(emb[:, a:b], *st.host_inputs(pos[:, a:b], torch.arange(a, b)), *caches)
            for i, kv in enumerate(out[1:]):
                caches[i][:, :, a:b] = kv
            assert (out[0] - ref).abs().max().item() < 1e-4


def test_rms_norm_fusion_covers_every_norm(tiny_ckpt):
    from reference import load_ours

    from autoglm_export.components import Shapes
    from autoglm_export.targets import get_target
    from autoglm_export.models.glm4v.blocks import RMSNorm

    BACKEND = get_target("onnx-qnn")

    _, mods = load_ours(tiny_ckpt, Shapes(image_size=56, max_context=64, prefill_chunk=8))
    vision = mods["vision_encoder"]
    for m in vision.modules():
        if isinstance(m, RMSNorm):
            m.plain = True
    model = BACKEND._onnx(vision, vision.example_inputs(), ["pixel_values"], ["image_embeddings"])
    ops = [n.op_type for n in model.graph.node]
    norms = sum(isinstance(m, RMSNorm) for m in vision.modules())
    assert ops.count("SimplifiedLayerNormalization") == norms and "Sqrt" not in ops
