"""--target onnx on the tiny checkpoint: ONNX Runtime CPU, MatMulNBits INT4, same gates as xnnpack."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import REPO, one_bucket, run_cli, tree_snapshot

TINY_RECIPE = REPO / "recipes" / "onnx-tiny.yaml"


@pytest.fixture(scope="module")
def onnx_bundle(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "bundle"
    proc = run_cli("--target", "onnx", "--checkpoint", tiny_ckpt, "--out", out, "--recipe", TINY_RECIPE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_gates_and_layout(onnx_bundle):
    names = sorted(p.name for p in onnx_bundle.iterdir())
    assert names == [
        "chat_template.jinja",
        "manifest.json",
        "report.json",
        "text_decoder.onnx",
        "token_embedding.onnx",
        "tokenizer.json",
        "vision_encoder.onnx",
        "vision_encoder_224x112.onnx",
    ]
    report = json.loads((onnx_bundle / "report.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert report["passed"]
    assert checks["vision_encoder/lowered_vs_reference"]["sqnr_db"] >= 60
    dec = checks["text_decoder/lowered_vs_reference"]
    assert dec["threshold_db"] == 35 and dec["sqnr_db"] >= 35
    assert checks["end_to_end/greedy_lowered_vs_reference"]["agreement"] == 1.0
    assert checks["end_to_end/greedy_lowered_vs_reference"]["tokens"] == 32


def test_failed_gate_names_the_component(tiny_ckpt, tmp_path):
    """A gate that fails: exit 1, the component named on stderr and in report.json, the bundle kept
    for inspection (the pipeline's behaviour for every target; onnx is the quickest to export)."""
    recipe = tmp_path / "strict.yaml"
    text = one_bucket(TINY_RECIPE.read_text()).replace("float_sqnr_db: 60", "float_sqnr_db: 200")
    assert "float_sqnr_db: 200" in text
    recipe.write_text(text)
    out = tmp_path / "b"
    proc = run_cli("-q", "--target", "onnx", "--checkpoint", tiny_ckpt, "--out", out, "--recipe", recipe)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "vision_encoder/lowered_vs_reference" in proc.stderr and "Traceback" not in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and report["failed"] == ["vision_encoder/lowered_vs_reference"]


def test_decoder_linears_are_matmulnbits(onnx_bundle):
    import onnx

    m = json.loads((onnx_bundle / "manifest.json").read_text())
    dec = m["components"]["text_decoder"]
    # 2 layers x (q, k, v, o, gate_up, down) + lm_head
    assert dec["onnx_ops"]["MatMulNBits"] == 13 and len(dec["quantized_outputs"]) == 13
    assert dec["quantization"]["params_by_scheme"]["int4-g32"] == 106496
    model = onnx.load(str(onnx_bundle / "text_decoder.onnx"))
    inputs = [i.name for i in model.graph.input]
    assert inputs[:3] == ["inputs_embeds", "position_ids", "cache_position"] and inputs[3] == "k_cache_0"
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["bits"] == 4 and attrs["block_size"] == 32 and len(node.input) == 3  # symmetric
    assert m["versions"]["onnxruntime"] == "1.31.1"


def test_dequantization_matches_onnxruntime(monkeypatch):
    """The read-back reference weights are exactly what MatMulNBits multiplies by, dequantized
    whole or a few rows at a time into the module's own weight."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from autoglm_export.targets.onnx.reference import NBitsWeight

    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 48)).astype(np.float32)  # [K, N] as MatMul's B
    x = rng.standard_normal((2, 96)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 96])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 48])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)
    q = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True)
    q.process()
    qm = q.model.model
    node = next(n for n in qm.graph.node if n.op_type == "MatMulNBits")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in qm.graph.initializer}
    weight = NBitsWeight.of(node, inits)
    deq = weight.into(np.empty((weight.n, weight.k), np.float32))
    y = ort.InferenceSession(qm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(y - x @ deq.T).max() < 1e-4
    assert np.abs(deq.T - w).max() > 1e-3  # really quantized
    import autoglm_export.quantize as quantize

    monkeypatch.setattr(quantize, "REFERENCE_BLOCK_ELEMENTS", 5 * 96)  # 5 rows a block, a short last one
    into = np.full((48, 96), np.nan, np.float32)
    assert weight.into(into) is into
    assert np.array_equal(into, deq)
    with pytest.raises(ValueError, match="N = 48, K = 96"):
        weight.into(np.empty((96, 48), np.float32))


def test_reference_keeps_large_weights_quantized_with_the_same_outputs(onnx_bundle, tiny_ckpt, monkeypatch):
    """The decoder reference with every int4 linear kept as codes, dequantized a few rows at a time
    per call (what 9B-width weights get), computes what the reference with plain dequantized weights
    computes, and holds no fp32 copy of those weights."""
    import torch

    import autoglm_export.quantize as quantize
    import autoglm_export.targets.onnx.reference as onnx_reference
    from autoglm_export.bundle import load_bundle
    from autoglm_export.checkpoint import open_checkpoint
    from autoglm_export.components import Shapes
    from autoglm_export.planning import plan_quantization
    from autoglm_export.recipe import parse_recipe
    from autoglm_export.targets import get_target
    from autoglm_export.verify import load_reference

    manifest = load_bundle(onnx_bundle)
    recipe = parse_recipe(manifest["recipe"]["content"], onnx_bundle / "manifest.json")
    ckpt, shapes = open_checkpoint(tiny_ckpt), Shapes.from_recipe(recipe)
    plans = plan_quantization(recipe, ckpt, shapes, "recipe")
    tgt = get_target("onnx")
    plain = load_reference(
        ckpt, "text_decoder", shapes, plans["text_decoder"], tgt, onnx_bundle, manifest, per_call=False
    )
    monkeypatch.setattr(quantize, "REFERENCE_BLOCK_ELEMENTS", 7 * ckpt.spec.text.hidden_size)  # 7 rows a block
    packed = load_reference(ckpt, "text_decoder", shapes, plans["text_decoder"], tgt, onnx_bundle, manifest)
    kept = [m for m in packed.modules() if isinstance(m, onnx_reference.MatMulNBitsLinear)]
    block = 7 * ckpt.spec.text.hidden_size
    large = [w for w in plans["text_decoder"].weights.values() if w.scheme == "int4" and w.params > block]
    assert len(kept) == len(large) > 0
    assert kept and all(not hasattr(m, "weight") for m in kept)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, ckpt.spec.text.hidden_size, generator=g)
    pos, slots = torch.arange(5).expand(3, 5).contiguous(), torch.arange(5)
    with torch.no_grad():
        plain.reset_cache()
        packed.reset_cache()
        a, b = plain(x, pos, slots), packed(x, pos, slots)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def test_export_is_byte_identical(onnx_bundle, tiny_ckpt, tmp_path):
    again = tmp_path / "again"
    proc = run_cli("-q", "--target", "onnx", "--checkpoint", tiny_ckpt, "--out", again, "--recipe", TINY_RECIPE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for p in onnx_bundle.iterdir():
        assert p.read_bytes() == (again / p.name).read_bytes(), p.name


def test_verify_and_run(onnx_bundle):
    proc = run_cli("verify", onnx_bundle)
    assert proc.returncode == 0 and "overall: PASS" in proc.stdout, proc.stderr[-2000:]
    proc = run_cli(
        "run",
        onnx_bundle,
        "--prompt",
        "Describe the screen",
        "--image",
        REPO / "tests/data/screen.png",
        "--max-new-tokens",
        "6",
    )
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]


def test_int8_rule_is_refused_for_onnx(tiny_ckpt, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE.read_text().replace("scheme: int4\n    group_size: 32", "scheme: int8"))
    before = tree_snapshot(tmp_path)
    proc = run_cli("--target", "onnx", "--checkpoint", tiny_ckpt, "--out", tmp_path / "o", "--recipe", recipe)
    assert proc.returncode == 2 and "int8" in proc.stderr and "Traceback" not in proc.stderr
    assert tree_snapshot(tmp_path) == before


def test_large_weights_go_to_external_data_once(tiny_ckpt, tmp_path, monkeypatch):
    """Weights over the threshold go to external data, the exporter's programs spill theirs while
    they wait, and the second image bucket's model points at the first's external data for every
    weight they share (all but its grid's tables): one copy of the ViT on disk, both buckets gated
    on it. A model that reads a file its manifest entry does not list is refused before ONNX
    Runtime opens it."""
    from pathlib import Path

    import onnx

    from autoglm_export.pipeline import export
    from autoglm_export.targets.onnx import target as onnxrt

    monkeypatch.setattr(onnxrt, "EXTERNAL_DATA_THRESHOLD", 1024)  # the tiny weights go external
    waiting = {}
    lower = onnxrt.OnnxTarget.lower

    def spy(self, programs, *args, **kwargs):  # what the exported programs hold while they wait for lower()
        for name, prog in programs.items():
            waiting[name] = (max(len(t.raw_data) for t in prog["model"].graph.initializer), Path(prog["scratch"].name))
            assert sum(f.stat().st_size for f in waiting[name][1].iterdir() if f.suffix == ".data") > 1024
        return lower(self, programs, *args, **kwargs)

    monkeypatch.setattr(onnxrt.OnnxTarget, "lower", spy)
    out = tmp_path / "ext"
    report = export(checkpoint=tiny_ckpt, target="onnx", out=out, recipe=TINY_RECIPE)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["passed"] and checks["vision_encoder_224x112/lowered_vs_reference"]["sqnr_db"] >= 60
    assert sorted(waiting) == ["text_decoder", "token_embedding", "vision_encoder", "vision_encoder_224x112"]
    assert all(raw <= 1024 for raw, _ in waiting.values())  # weights spilled, not held in memory
    assert not any(scratch.exists() for _, scratch in waiting.values())  # and the scratch files are gone
    m = json.loads((out / "manifest.json").read_text())
    data_files = [n for n in m["files"] if n.endswith(".onnx.data")]
    assert sorted(data_files) == [
        "text_decoder.onnx.data",
        "token_embedding.onnx.data",
        "vision_encoder.onnx.data",
        "vision_encoder_224x112.onnx.data",
    ]
    assert (out / "text_decoder.onnx").stat().st_size < 64 * 1024  # the graph, not the weights

    first, second = m["components"]["vision_encoder"], m["components"]["vision_encoder_224x112"]
    assert first["data_files"] == ["vision_encoder.onnx.data"]
    assert second["data_files"] == ["vision_encoder.onnx.data", "vision_encoder_224x112.onnx.data"]
    model = onnx.load(str(out / second["file"]), load_external_data=False)
    by_file: dict[str, int] = {}
    for t in model.graph.initializer:
        if onnxrt.external(t):
            entry = onnxrt.external_data_entry(t)
            by_file[entry["location"]] = by_file.get(entry["location"], 0) + entry["length"]
    own = m["files"]["vision_encoder_224x112.onnx.data"]["bytes"]
    assert by_file["vision_encoder_224x112.onnx.data"] == own  # its own file: only what it reads
    assert by_file["vision_encoder.onnx.data"] > 4 * own  # the ViT, read from the first bucket's file

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "text_decoder.onnx.data").write_bytes(b"\0" * (bad / "text_decoder.onnx.data").stat().st_size)
    proc = run_cli("run", bad, "--prompt", "hi")
    assert proc.returncode == 2 and "text_decoder.onnx.data" in proc.stderr
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    bm = json.loads((bad / "manifest.json").read_text())
    bm["components"]["vision_encoder_224x112"]["data_files"] = ["vision_encoder_224x112.onnx.data"]
    (bad / "manifest.json").write_text(json.dumps(bm))
    proc = run_cli("run", bad, "--prompt", "hi")
    assert proc.returncode == 2 and "does not list" in proc.stderr and "vision_encoder.onnx.data" in proc.stderr
    bm["components"]["vision_encoder_224x112"]["data_files"] = ["../vision_encoder.onnx.data"]
    (bad / "manifest.json").write_text(json.dumps(bm))
    proc = run_cli("run", bad, "--prompt", "hi")
    assert proc.returncode == 2 and "outside the bundle" in proc.stderr


def test_initializer_sizes_come_from_shapes():
    """Protobuf cannot serialise past 2 GiB (the real fp32 token embedding is 2.5 GB), so sizes
    must not come from ByteSize()."""
    import onnx

    from autoglm_export.targets.onnx.target import _nbytes

    small = onnx.numpy_helper.from_array(np.ones((3, 5), np.float32))
    assert _nbytes(small) == 60
    real_embedding = onnx.TensorProto(name="embed", data_type=onnx.TensorProto.FLOAT, dims=[151552, 4096])
    assert _nbytes(real_embedding) == 151552 * 4096 * 4
    half = onnx.numpy_helper.from_array(np.ones((4, 4), np.float16))
    assert _nbytes(half) == 32


def test_verify_against_onnxruntime_on_an_onnx_bundle(onnx_bundle):
    proc = run_cli("verify", onnx_bundle, "--against", "onnxruntime")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("onnxruntime/")]
    assert len(lines) == 9 and all(line.rstrip().endswith("PASS") for line in lines)  # 4 methods x 2 + greedy
    proc = run_cli("verify", onnx_bundle, "--against", "tflite")
    assert proc.returncode == 2 and "onnxruntime" in proc.stderr


def test_decoder_in_parts_matches_the_whole_decoder(onnx_bundle, tiny_ckpt, tmp_path):
    """recipe ``lowering.decoder_layers_per_program: 1``: one model per layer (each with its own KV
    cache inputs), the gates pass, and in ONNX Runtime the chained parts give the whole decoder's
    logits over a prefill and two decode steps."""
    import torch

    from autoglm_export.targets.onnx.target import OnnxRuntime

    recipe = tmp_path / "onnx-parts.yaml"
    recipe.write_text(one_bucket(TINY_RECIPE.read_text()) + "lowering:\n  decoder_layers_per_program: 1\n")
    out = tmp_path / "parts"
    proc = run_cli("-q", "--target", "onnx", "--checkpoint", tiny_ckpt, "--out", out, "--recipe", recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"]["passed"] is True
    parts = m["components"]["text_decoder"]["programs"]
    assert [p["file"] for p in parts] == ["text_decoder.00-00.onnx", "text_decoder.01-01.onnx"]
    assert not (out / "text_decoder.onnx").exists() and all(p["quantized_outputs"] for p in parts)
    whole = OnnxRuntime.from_bundle(onnx_bundle, json.loads((onnx_bundle / "manifest.json").read_text()))
    chained = OnnxRuntime.from_bundle(out, m)
    assert [len(n) for n in chained.cache_names] == [2, 2]
    g = torch.Generator().manual_seed(5)
    for start, length in ((0, 7), (7, 1), (8, 1)):
        x = torch.randn(1, length, 64, generator=g)
        pos = torch.arange(start, start + length)
        p3 = pos.unsqueeze(0).expand(3, length).contiguous()
        np.testing.assert_allclose(
            chained.text_decoder(x, p3, pos).numpy(), whole.text_decoder(x, p3, pos).numpy(), rtol=0, atol=1e-5
        )
    # byte-identical again: every model file of a second export (without the parity runs)
    from autoglm_export.pipeline import export

    again = tmp_path / "again"
    export(checkpoint=tiny_ckpt, target="onnx", out=again, recipe=recipe, verify=False)
    models = sorted(p.name for p in out.iterdir() if p.name not in ("manifest.json", "report.json"))
    assert "text_decoder.01-01.onnx" in models and models == sorted(
        p.name for p in again.iterdir() if p.name not in ("manifest.json", "report.json")
    )
    for name in models:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
