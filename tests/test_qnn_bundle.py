"""--target qnn on the tiny checkpoint: ExecuTorch + QNN HTP delegate (PT2E QnnQuantizer), compiled
for SM8650 with the onnxruntime-qnn wheel's QNN 2.51 libraries through the compatibility layer,
run on the x86 HTP emulator and compared with the PyTorch simulation of the same quantization."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, recipe_text, run_cli, tree_snapshot

RECIPE = REPO / "recipes" / "qnn-tiny.yaml"


@pytest.fixture(scope="module")
def bundle(qnn_bundle):
    return qnn_bundle


PARTS = ["text_decoder.00-00.pte", "text_decoder.01-01.pte"]  # qnn-tiny: the decoder in parts of one layer


def test_gates_graphs_and_manifest(bundle):
    out, proc = bundle
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["chat_template.jinja", "manifest.json", "model.pte", "report.json", "tokenizer.json", *PARTS]
    )
    m = json.loads((out / "manifest.json").read_text())
    q = m["qnn"]
    assert (q["soc"], q["soc_model"], q["htp_arch"]) == ("SM8650", 57, 75) and q["pte_soc_type"] == "soc_type=SM8650"
    assert q["libraries"]["compat_layer"] and q["libraries"]["qnn_version"].startswith("2.51")
    for f in ("model.pte", *PARTS):
        assert b"soc_type=SM8650" in (out / f).read_bytes()
    graphs = {g: spec for comp in m["components"].values() if "graphs" in comp for g, spec in comp["graphs"].items()}
    assert set(graphs) == {
        "vision_encoder",
        "vision_encoder_224x112",
        "token_embedding_prefill",
        "token_embedding_decode",
    }
    assert graphs["vision_encoder_224x112"]["inputs"][0]["shape"] == [128, 588]  # the portrait bucket: 16 x 8 patches
    programs = m["components"]["text_decoder"]["programs"]
    assert [(p["file"], p["layers"]) for p in programs] == [(PARTS[0], [0, 1]), (PARTS[1], [1, 2])]
    for p in programs:
        graphs |= {f"{p['file']}:{g}": spec for g, spec in p["graphs"].items()}
    first, last = (p["graphs"]["text_decoder_decode"] for p in programs)
    # each part takes its own layer's caches; hidden states pass from the first to the last, which has the head
    assert [i["name"] for i in first["inputs"]][4:] == ["k_cache_0", "v_cache_0"] and first["outputs"][
        0
    ] == "hidden_states"
    assert [i["name"] for i in last["inputs"]][4:] == ["k_cache_1", "v_cache_1"] and last["outputs"][0] == "logits"
    assert programs[0]["graphs"]["text_decoder_prefill"]["tokens"] == 16 and first["precision"] == "16a4w/16a8w"
    assert "per output channel" in first["int4_granularity"] and "int4_granularity" not in graphs["vision_encoder"]
    # and the plan counts them so: one scale per row, not the rule's groups of 32
    assert set(m["components"]["text_decoder"]["quantization"]["params_by_scheme"]) == {"int4-channel", "int8", "fp32"}
    checks = {c["name"]: c for c in json.loads((out / "report.json").read_text())["checks"]}
    for g, spec in graphs.items():
        assert (
            spec["ops_outside_delegate"] == [] and spec["contexts"] >= 1 and all(b > 0 for b in spec["context_bytes"])
        )
        assert checks[f"qnn/{g}/all_ops_delegated"]["passed"]
    assert checks["runtime/metadata_methods"]["passed"]
    for name in ("vision_encoder", "token_embedding", "text_decoder"):
        c = checks[f"{name}/lowered_vs_reference"]
        assert c["threshold_db"] == 30 and c["passed"] and (c["bit_exact"] or c["sqnr_db"] >= 30)
    e2e = checks["end_to_end/greedy_lowered_vs_reference"]
    assert e2e["gated"] is False and e2e["tokens"] == 32 and e2e["agreement"] == 1.0  # measured, reported
    assert "overall: PASS" in proc.stdout


def test_deterministic_and_verify(bundle, tiny_ckpt, tmp_path):
    """A second export gives the same model.pte (context signatures pinned) and manifest; `verify` in a
    fresh process rebuilds the PT2E simulation from the checkpoint. (`run`: test_run_on_the_emulator.)
    The second export skips the parity stage (library `verify=False`): it only reads what was written."""
    out, _ = bundle
    again = tmp_path / "again"
    code = (
        "import sys; from autoglm_export.pipeline import export; "
        "export(checkpoint=sys.argv[1], target='qnn', out=sys.argv[2], recipe=sys.argv[3], verify=False)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tiny_ckpt), str(again), str(RECIPE)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for f in ("model.pte", *PARTS):
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    first, second = (json.loads((d / "manifest.json").read_text()) for d in (out, again))
    assert "skipped" in second.pop("verification") and first.pop("verification")["passed"]
    assert first == second
    proc = run_cli("verify", out)
    assert proc.returncode == 0 and "text_decoder/lowered_vs_reference" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("target", ["qnn", "onnx-qnn"])
def test_htp_targets_refuse_fp32_components_in_one_line(target, tiny_ckpt, tmp_path):
    recipe = REPO / "recipes" / f"{target}-tiny.yaml"
    bad = tmp_path / "bad.yaml"  # calibration paths made absolute: they resolve against the recipe's directory
    text = recipe_text(recipe)
    bad.write_text(
        text.replace("'vision_encoder\\..*\\.weight'\n    scheme: int8", "'vision_encoder\\..*'\n    scheme: fp32")
    )
    assert bad.read_text() != recipe.read_text()
    out = tmp_path / "out"
    proc = run_cli("-q", "--target", target, "--checkpoint", tiny_ckpt, "--out", out, "--recipe", bad)
    assert proc.returncode == 2 and "HTP has no fp32" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and tree_snapshot(out) == {}


def test_qnn_refuses_a_4_bit_token_embedding_in_one_line(tiny_ckpt, tmp_path):
    """The HTP stores a 4-bit Gather table at a byte per weight, as an 8-bit one (measured: 1.20 vs
    1.17 bytes per weight of the lowered context), so an int4 rule on the table is refused."""
    bad = tmp_path / "bad.yaml"
    text = recipe_text(RECIPE)
    bad.write_text(
        text.replace(
            "'token_embedding\\.embed_tokens\\.weight'\n    scheme: int8",
            "'token_embedding\\.embed_tokens\\.weight'\n    scheme: int4\n    group_size: 32",
        )
    )
    assert "scheme: int4\n    group_size: 32\n  - match: 'vision" in bad.read_text()
    out = tmp_path / "out"
    proc = run_cli("-q", "--target", "qnn", "--checkpoint", tiny_ckpt, "--out", out, "--recipe", bad)
    assert proc.returncode == 2 and "4-bit weights only on MatMul weights" in proc.stderr, proc.stderr
    assert "token_embedding.embed_tokens.weight" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and tree_snapshot(out) == {}


def _script_result(script: str, *args) -> dict:
    """Run ``script`` in a fresh interpreter (the QNN libraries load there) and return the JSON of
    its last line."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_EMBEDDING_CONTEXT = """
import dataclasses, json, sys
import torch
from autoglm_export.checkpoint import open_checkpoint
from autoglm_export.targets.qnn import target as qnn
from autoglm_export.targets.qnn.contexts import plan_contexts
from autoglm_export.targets.shared.static_graphs import static_graphs
from autoglm_export.models.glm4v.text import TokenEmbedding
from autoglm_export.quantize import plan_component
from autoglm_export.recipe import load_recipe

qnn.preload_qnn_libraries()
spec = open_checkpoint(sys.argv[1]).spec
spec = dataclasses.replace(spec, text=dataclasses.replace(spec.text, vocab_size=16384))
torch.manual_seed(0)
module = TokenEmbedding(spec)
recipe = load_recipe(sys.argv[2])
plan = plan_component(recipe, "token_embedding", module, sys.argv[2])
graphs = static_graphs("token_embedding", module, 16, {})
qnn.QUANTIZE_SLICE_ELEMENTS = 1000  # 15 rows of 64 per slice: the table is quantized in 1093 slices, the last one short
sliced, whole = [], qnn.quantize_per_channel_in_slices
def counted(weight, *a, **k):
    sliced.append(list(weight.shape))
    return whole(weight, *a, **k)
qnn.quantize_per_channel_in_slices = counted
quantized = {g: qnn.quantize_graph(s, plan) for g, s in graphs.items()}
gm = quantized["token_embedding_decode"]
emb = next(n for n in gm.graph.nodes if n.op == "call_function" and "embedding" in str(n.target))
deq = emb.args[0]
codes = getattr(gm, deq.args[0].target)
scales = getattr(gm, deq.args[1].target)
ctx = plan_contexts(plan, 2, 10**9, True, sys.argv[2])
low = qnn._lower_group(quantized, {g: s.args for g, s in graphs.items()}, False, ctx, plan)
from executorch.exir.lowered_backend_module import get_lowered_submodules
sizes = [len(m.processed_bytes) for _, m, _ in get_lowered_submodules(low.exported_program("token_embedding_decode").graph_module)]
# the same conversion with torchao's constant folding as it is (every dequantize node evaluated, each
# weight quantized whole)
import contextlib
patched, qnn._lean_weight_folding = qnn._lean_weight_folding, contextlib.nullcontext
plain = qnn.quantize_graph(graphs["token_embedding_decode"], plan)
qnn._lean_weight_folding = patched
consts = lambda g: [getattr(g, n.target) for n in g.graph.nodes if n.op == "get_attr" and isinstance(getattr(g, n.target), torch.Tensor)]
same = plain.code == gm.code and all(torch.equal(a, b) for a, b in zip(consts(plain), consts(gm), strict=True))
# the reference (verify) holds the graphs lean: the table dequantized for the looked-up rows only and
# held once for both graphs, with the outputs of the graphs as converted
qnn.quantize_per_channel_in_slices = whole
from autoglm_export.targets.qnn import simulation
simulation.LARGE_WEIGHT_ELEMENTS = 1000
want = {g: qnn.quantize_graph(s, plan)(*s.args) for g, s in graphs.items()}
pool = {}
lean = {g: simulation.lean_simulation(qnn.quantize_graph(s, plan), pool) for g, s in graphs.items()}
tables = [getattr(g, n.target) for g in lean.values() for n in g.graph.nodes
          if n.op == "get_attr" and getattr(g, n.target).dtype == torch.int8]
lean_ok = {"same_outputs": all(torch.equal(lean[g](*s.args), want[g]) for g, s in graphs.items()),
           "tables": len(tables), "one_table": all(t is tables[0] for t in tables),
           "whole_dequantize": sum(n.target == deq.target for g in lean.values() for n in g.graph.nodes)}
# lowering reads only the converted graphs (quantize_graph dropped the unread float table from them):
# the module's float table is freed
params = module.embed_tokens.weight.numel()
qnn._free_float_weights([module], quantized.values())
shed = module.embed_tokens.weight.numel() == 0 and not any(t.is_floating_point() and t.numel() >= codes.numel()
                                                           for g in quantized.values() for t in g.state_dict().values())
print(json.dumps({"dequant": str(deq.target), "codes": [str(codes.dtype), list(codes.shape)], "scales": list(scales.shape),
                  "params": params, "context_bytes": sizes, "same_as_unpatched": same,
                  "sliced": sliced, "float_table_freed": shed, "codes_kept": codes.data_ptr() != 0, "lean": lean_ok}))
"""


def test_token_embedding_is_int8_per_row_in_its_htp_context(tiny_ckpt):
    """The embedding table's weights are 8-bit codes with one scale per row (QnnQuantizer's
    per-channel embedding), about one byte per parameter in the HTP context. Quantized per tensor,
    QNN kept the table at 4 bytes per parameter (at 9B widths: 2.5 GB of a qnn bundle) and lowering
    it took ~28 bytes of host memory per parameter (docs/benchmarks.md)."""
    r = _script_result(_EMBEDDING_CONTEXT, tiny_ckpt, RECIPE)
    assert r["dequant"] == "quantized_decomposed.dequantize_per_channel.default"
    assert r["codes"] == ["torch.int8", [16384, 64]] and r["scales"] == [16384]
    assert len(r["context_bytes"]) == 1 and r["context_bytes"][0] < 1.25 * r["params"], r
    # quantize_graph skips evaluating dequantize nodes during constant folding (12 bytes per parameter
    # of the largest weight) and quantizes weights a slice of rows at a time (8 bytes per parameter);
    # the converted graph and its constants are the same as without either
    assert r["same_as_unpatched"]
    assert r["sliced"].count([16384, 64]) == 2, r["sliced"]  # the table of each graph went through the slices
    assert r["float_table_freed"] and r["codes_kept"]
    # verify's reference: one table for both graphs, no whole-table dequantize, the same outputs
    assert r["lean"] == {"same_outputs": True, "tables": 2, "one_table": True, "whole_dequantize": 0}, r["lean"]


_VISION_CONTEXT = """
import json, sys
import torch
from autoglm_export.checkpoint import open_checkpoint
from autoglm_export.load import build_on_meta, load_component
from autoglm_export.targets.qnn import target as qnn
from autoglm_export.targets.qnn.contexts import plan_contexts
from autoglm_export.targets.shared.static_graphs import static_graphs
from autoglm_export.models.glm4v.vision import PatchMerger, VisionEncoder
from autoglm_export.quantize import plan_component
from autoglm_export.recipe import load_recipe

qnn.preload_qnn_libraries()
ckpt = open_checkpoint(sys.argv[1])
out = {}
for path in sys.argv[2:]:
    module = load_component(build_on_meta(lambda: VisionEncoder(ckpt.spec, 112)), ckpt)
    torch.manual_seed(0)  # a wider merger MLP than the tiny one (64 x 96): HTP contexts grow in pages of 4 KiB
    module.merger = PatchMerger(ckpt.spec.vision.out_hidden_size, 2048).eval()
    recipe = load_recipe(path)
    plan = plan_component(recipe, "vision_encoder", module, path)
    graphs = static_graphs("vision_encoder", module, 16, {})
    g = graphs["vision_encoder"]
    paths = {n.name: p for n, p in qnn._linear_module_paths(torch.export.export(g.module, g.args, strict=False).module()).items()}
    gm = qnn.quantize_graph(g, plan)
    ranges = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and "linear" in str(n.target):
            deq = n.args[1]  # converted weights are renamed (_frozen_param*); the linear nodes keep their names
            ranges[paths[n.name]] = [deq.args[4], deq.args[5]]
    ctx = plan_contexts(plan, 1, 10**9, False, path)
    low = qnn._lower_group({"vision_encoder": gm}, {"vision_encoder": g.args}, False, ctx, plan)
    from executorch.exir.lowered_backend_module import get_lowered_submodules
    sizes = [len(m.processed_bytes) for _, m, _ in get_lowered_submodules(low.exported_program("vision_encoder").graph_module)]
    out[path] = {"ranges": ranges, "context_bytes": sizes}
print(json.dumps(out))
"""


def test_compact_recipe_puts_the_vision_merger_in_4_bits(tiny_ckpt):
    """recipes/qnn-compact.yaml (the 9B bundle under 6.0 GB, docs/benchmarks.md): the merger's
    linears take 4-bit codes (16a4w), the ViT blocks keep 8-bit, and the HTP context shrinks by about
    half a byte per merger weight against qnn.yaml's all-8-bit encoder."""
    compact, default = REPO / "recipes" / "qnn-compact.yaml", REPO / "recipes" / "qnn.yaml"
    r = _script_result(_VISION_CONTEXT, tiny_ckpt, compact, default)
    small, full = r[str(compact)], r[str(default)]
    assert full["ranges"].keys() == small["ranges"].keys() and all(v == [-127, 127] for v in full["ranges"].values())
    merger = {k for k in small["ranges"] if "merger" in k}
    assert len(merger) == 4, small["ranges"]  # proj, gate_proj, up_proj, down_proj
    assert all(small["ranges"][k] == [-7, 7] for k in merger)
    assert all(v == [-127, 127] for k, v in small["ranges"].items() if k not in merger)
    dim = json.loads((tiny_ckpt / "config.json").read_text())["vision_config"]["out_hidden_size"]
    merger_params = dim * dim + 3 * dim * 2048
    saved = full["context_bytes"][0] - small["context_bytes"][0]
    assert 0.4 * merger_params < saved < 0.6 * merger_params, (saved, merger_params, r)


def test_no_onnxruntime_gate_for_qnn_bundles(bundle):
    """--against onnxruntime on a qnn bundle: a one-line error naming the way that has one (onnx-qnn)."""
    out, _ = bundle
    proc = run_cli("verify", out, "--against", "onnxruntime")
    assert proc.returncode == 2 and "onnx-qnn" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_decoder_split_into_contexts_and_calibration_recorded(bundle):
    """qnn-tiny's max_context_bytes cuts the decoder's last part (and the audio-less encoders stay
    whole): both of its graphs run their two contexts back to back with nothing outside the delegate."""
    out, _ = bundle
    m = json.loads((out / "manifest.json").read_text())
    first, dec = m["components"]["text_decoder"]["programs"]
    assert [g["units"] for g in first["contexts"]["groups"]] == [["0"]]
    assert dec["contexts"]["contexts"] == 2 and dec["contexts"]["weight_sharing"] is False
    assert [g["units"] for g in dec["contexts"]["groups"]] == [["1"], ["post"]]
    assert all(g["estimated_weight_bytes"] <= 80000 for g in dec["contexts"]["groups"])
    for g in ("text_decoder_prefill", "text_decoder_decode"):
        assert dec["graphs"][g]["contexts"] == 2 and dec["graphs"][g]["ops_outside_delegate"] == []
    # partition i of prefill and decode compile into context i: the same binaries
    assert (
        dec["graphs"]["text_decoder_prefill"]["context_bytes"] == dec["graphs"]["text_decoder_decode"]["context_bytes"]
    )
    assert m["components"]["vision_encoder"]["graphs"]["vision_encoder"]["contexts"] == 1
    cal = m["calibration"]
    assert (
        cal["images"] == 2
        and cal["prompts"] == 6
        and set(cal["files"]) == {"calibration/settings.png", "calibration/chat.png", "calibration/prompts.txt"}
    )
    report = {c["name"]: c for c in json.loads((out / "report.json").read_text())["checks"]}
    assert report[f"qnn/{PARTS[1]}:text_decoder_decode/all_ops_delegated"]["detail"].startswith("2 QNN context(s)")


def test_weight_sharing_bundle_is_verified_on_an_unshared_twin(bundle, qnn_shared_audio_bundle, tmp_path):
    """With qnn.weight_sharing the decoder's prefill and decode graphs keep one copy of each
    context's weights (smaller than the unshared fixture); the emulator cannot load such contexts,
    so the export verifies a twin compiled without sharing, and a later `verify` or `run` says why it
    cannot. This export (of the audio checkpoint, whose decoder has the fixture's shapes; test_audio
    reads it too) also keeps the decoder in one program (the fixture's is in parts)."""
    out, _ = bundle
    shared, proc = qnn_shared_audio_bundle
    assert "overall: PASS" in proc.stdout and "emulator twin" in proc.stderr, proc.stderr[-3000:]
    m = json.loads((shared / "manifest.json").read_text())
    dec = m["components"]["text_decoder"]
    assert dec["contexts"]["weight_sharing"] is True and dec["contexts"]["contexts"] == 2
    assert [g["units"] for g in dec["contexts"]["groups"]] == [["0", "1"], ["post"]]  # as the fixture, one weight copy
    unshared = json.loads((out / "manifest.json").read_text())["components"]["text_decoder"]["programs"]
    assert "programs" not in dec and dec["file"] == "model.pte"
    # the encoders are cut too: fp16 audio into four contexts (one per unit), the 8-bit vision into two
    assert [m["components"][c]["contexts"]["contexts"] for c in ("audio_encoder", "vision_encoder")] == [4, 2]
    assert sum(dec["graphs"]["text_decoder_decode"]["context_bytes"]) < sum(
        sum(p["graphs"]["text_decoder_decode"]["context_bytes"]) for p in unshared
    )
    assert "twin" in m["qnn"]["emulator_note"] and sorted(p.name for p in shared.iterdir()) == [
        "chat_template.jinja",
        "manifest.json",
        "model.pte",
        "report.json",
        "tokenizer.json",
    ]
    # the same bundle as an export with verification off leaves it: no twin, no report.json
    unverified = tmp_path / "unverified"
    shutil.copytree(shared, unverified, ignore=shutil.ignore_patterns("report.json"))
    for args, said in (
        (("verify", shared, "-q"), "verified at export on an unshared twin (report.json)"),
        (("run", shared, "--prompt", "hi"), "verified at export on an unshared twin (report.json)"),
        (("run", unverified, "--prompt", "hi"), "exported without verification (no report.json)"),
    ):
        proc = run_cli(*args)
        assert proc.returncode == 2 and "weight_sharing: false" in proc.stderr and "Traceback" not in proc.stderr, (
            proc.stderr
        )
        assert len(proc.stderr.strip().splitlines()) == 1 and said in proc.stderr, proc.stderr


def test_run_on_the_emulator(bundle):
    """`run` on a qnn bundle: the chained decoder parts on the x86 HTP emulator. (The audio encoder on
    the emulator: the verification of test_audio's qnn bundle.)"""
    out, _ = bundle
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
    # a random model may answer with EOS straight away: the text can be empty, the run must succeed
    assert proc.returncode == 0 and proc.stdout.endswith("\n") and "error:" not in proc.stderr, proc.stderr[-2000:]


_LEAN_REFERENCE = """
import json, sys
from pathlib import Path
import numpy as np, torch
from autoglm_export import verify as V
from autoglm_export.bundle import load_bundle
from autoglm_export.checkpoint import open_checkpoint
from autoglm_export.host.generate import EagerRuntime, generate
from autoglm_export.metrics import compare
from autoglm_export.recipe import parse_recipe
from autoglm_export.targets import get_target
from autoglm_export.targets.qnn import simulation, target as qnn

bundle, ckpt = Path(sys.argv[1]), open_checkpoint(sys.argv[2])
manifest = load_bundle(bundle)
recipe = parse_recipe(manifest["recipe"]["content"], bundle / "manifest.json")
rewritten, shared = [], []
def counted(gm, pool):
    rewritten.append(simulation.dequantize_where_read(gm))
    shared.append(simulation.share_constants(gm, pool))
    return gm
def reference(kind):
    # every large-weight path taken at tiny widths (kind "lean"), or the converted graphs as they are
    simulation.LARGE_WEIGHT_ELEMENTS = simulation.SHARED_MIN_ELEMENTS = 1
    qnn.lean_simulation = counted if kind == "lean" else (lambda gm, pool: gm)
    tgt = get_target("qnn")
    shapes, plans, pre = V.configure_for_bundle(tgt, bundle, manifest, recipe, ckpt)
    case = V.GoldenCase(ckpt, pre, shapes)
    q = {n: V.load_reference(ckpt, n, shapes, plans[n], tgt, bundle, manifest) for n in plans}
    with torch.no_grad():
        outs = {n: [q[n](x).numpy() for x in xs] for n, xs in case.inputs.items()}
        trace = generate(EagerRuntime(q, shapes.max_context, shapes.prefill_chunk), case.prompt, **case.media, max_new_tokens=4)
    return outs, trace
(a, ta), (b, tb) = reference("lean"), reference("plain")
def sqnr(x, y):  # bit-exact counts as infinite
    c = compare(y, x)
    return float("inf") if c["bit_exact"] else c["sqnr_db"]
print(json.dumps({
    "rewritten": sum(rewritten), "shared_bytes": sum(shared), "graphs": len(rewritten),
    "same_embedding": all(np.array_equal(x, y) for x, y in zip(a["token_embedding"], b["token_embedding"])),
    "encoder_sqnr_db": {n: min(sqnr(x, y) for x, y in zip(a[n], b[n])) for n in a if n != "token_embedding"},
    "logits_sqnr_db": min(sqnr(x, y) for x, y in zip(ta.step_logits, tb.step_logits)),
    "tokens": [ta.tokens, tb.tokens],
}))
"""


def test_lean_reference_gives_the_converted_graphs_outputs(bundle, tiny_ckpt):
    """verify's qnn reference with every weight dequantized where read and every equal constant held
    once (thresholds lowered to 1 so the tiny widths take the 9B path): the token embedding's outputs
    exactly; the encoders' outputs and the decoder's greedy logits to float rounding (each linear
    computed a row of outputs at a time here), the same tokens."""
    out, _ = bundle
    r = _script_result(_LEAN_REFERENCE, out, tiny_ckpt)
    assert r["graphs"] >= 6 and r["rewritten"] >= 3 * r["graphs"] and r["shared_bytes"] > 0, r
    assert r["same_embedding"], r  # the looked-up rows: the same floats
    # float rounding, and the 16-bit activation quantization it can tip by a step: far inside the
    # 30 dB emulator-vs-reference gate
    assert min(r["encoder_sqnr_db"].values()) >= 60 and r["logits_sqnr_db"] >= 60, r
    assert r["tokens"][0] == r["tokens"][1], r
