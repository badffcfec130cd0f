"""--target xnnpack end to end on the tiny checkpoint: bundle, gates, manifest, verify, run, safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_cli, tree_snapshot

TINY_RECIPE = REPO / "recipes" / "xnnpack-tiny.yaml"


@pytest.fixture(scope="module")
def bundle(xnnpack_bundle):
    out, proc = xnnpack_bundle
    assert "lower/xnnpack" in proc.stderr  # progress output
    return out, proc


def _checks(report):
    return {c["name"]: c for c in report["checks"]}


def test_bundle_layout_and_gates(bundle):
    out, proc = bundle
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja",
        "manifest.json",
        "model.pte",
        "report.json",
        "tokenizer.json",
    ]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True and report["failed"] == []
    c = _checks(report)
    assert c["vision_encoder/lowered_vs_reference"]["threshold_db"] == 60
    assert c["vision_encoder/lowered_vs_reference"]["sqnr_db"] >= 60
    for name in ("token_embedding", "text_decoder"):  # INT4 components, same quantized weights
        chk = c[f"{name}/lowered_vs_reference"]
        assert chk["threshold_db"] == 35 and (chk["bit_exact"] or chk["sqnr_db"] >= 35)
    contract = c["runtime/metadata_methods"]
    assert contract["passed"] and contract["values"]["get_max_seq_len"] == 128
    e2e = c["end_to_end/greedy_lowered_vs_reference"]
    assert e2e["tokens"] == 32 and e2e["agreement"] == 1.0 and e2e["passed"]
    # the quantization error is measured and reported, never gated for INT4 components
    q = c["text_decoder/reference_vs_fp32"]
    assert q["gated"] is False and q["sqnr_db"] is not None and q["sqnr_db"] < 60
    assert "overall: PASS" in proc.stdout


def test_manifest_contract(bundle):
    out, _ = bundle
    m = json.loads((out / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["target"] == "xnnpack"
    assert set(m["components"]) == {"vision_encoder", "vision_encoder_224x112", "token_embedding", "text_decoder"}
    dec = m["components"]["text_decoder"]
    assert [i["name"] for i in dec["inputs"]] == ["inputs_embeds", "position_ids", "cache_position"]
    assert dec["quantization"]["params_by_scheme"]["int4-g32"] > 0
    assert 4.5 < dec["quantization"]["effective_bits_per_weight"] < 8
    # every op of a decoder layer in the XNNPACK delegate but the two KV-cache writes per layer
    layers = dec["delegation"]["layers"]
    assert layers["ops_outside"] == {"aten.index_put.default": 2 * m["model"]["text"]["num_layers"]}
    assert layers["ops_delegated"] > 20 * layers["ops_outside"]["aten.index_put.default"]
    # one cut per layer at its cache writes, plus the once-per-call mask / rotary / last-position ops
    assert dec["delegation"]["delegates"] <= m["model"]["text"]["num_layers"] + 3
    # the cache is written in place: the functional index_put copied each layer's whole cache out and
    # back on every call (checked to fail with ExecuTorch's reinplace pass off: index_put.out, copy_)
    from executorch.exir._serialize._program import deserialize_pte_binary

    plans = deserialize_pte_binary((out / "model.pte").read_bytes()).program.execution_plan
    (plan,) = [p for p in plans if p.name == "text_decoder"]
    operators = {f"{o.name}.{o.overload}" for o in plan.operators}
    assert "aten::index_put_." in operators and not {"aten::index_put.out", "aten::copy_."} & operators
    assert m["components"]["vision_encoder"]["inputs"][0]["shape"] == [64, 588]
    assert m["components"]["vision_encoder"]["outputs"][0]["shape"] == [16, 64]
    assert m["prompt"]["eos_ids"] == m["model"]["tokens"]["eos_token_ids"]
    assert m["components"]["vision_encoder_224x112"]["inputs"][0]["shape"] == [128, 588]
    assert m["components"]["vision_encoder_224x112"]["outputs"][0]["shape"] == [32, 64]
    assert m["preprocessing"]["buckets"] == [
        {"height": 112, "width": 112, "method": "vision_encoder", "tokens": 16, "grid": [4, 4]},
        {"height": 224, "width": 112, "method": "vision_encoder_224x112", "tokens": 32, "grid": [8, 4]},
    ]
    assert m["shapes"]["images"] == [[112, 112], [224, 112]]
    assert m["versions"]["executorch"] == "1.5.1" and m["versions"]["torch"].startswith("2.13.0")
    assert len(m["source"]["sha256"]) == 64
    for name, entry in m["files"].items():
        assert (out / name).stat().st_size == entry["bytes"]
    assert m["verification"]["passed"] is True


def test_image_buckets_share_one_copy_of_the_vision_weights(bundle, tiny_ckpt):
    """Each image bucket is its own method, but XNNPACK keys a program's constants by their content:
    every fp32 ViT weight of the tiny recipe is stored once in model.pte, not once per bucket."""
    from autoglm_export.checkpoint import open_checkpoint

    out, _ = bundle
    data = (out / "model.pte").read_bytes()
    ckpt = open_checkpoint(tiny_ckpt)
    names = [k for k, i in ckpt.tensors.items() if k.startswith("model.visual.blocks.") and len(i.shape) == 2]
    assert len(names) >= 5
    for k in names:
        raw = ckpt.tensor(k).float().numpy().tobytes()
        assert data.count(raw) == 1, k


def test_pte_methods_follow_the_runner_contract(bundle):
    out, _ = bundle
    from autoglm_export.targets.shared.executorch import ExecuTorchRuntime

    rt = ExecuTorchRuntime(out / "model.pte", 128, 16)
    names = set(rt.program.method_names)
    assert {"token_embedding", "vision_encoder", "text_decoder"} <= names
    assert rt.metadata("get_max_seq_len") == 128 and rt.metadata("get_max_context_len") == 128
    assert rt.metadata("use_kv_cache") is True and rt.metadata("get_vocab_size") == 512
    m = json.loads((out / "manifest.json").read_text())
    assert rt.metadata("get_eos_ids") == m["prompt"]["eos_ids"] and len(m["prompt"]["eos_ids"]) == 4
    assert rt.metadata("get_bos_id") == m["prompt"]["special_ids"]["gmask"]
    assert rt.metadata("enable_dynamic_shape") is True


def test_export_is_byte_identical(bundle, tiny_ckpt, tmp_path):
    out, _ = bundle
    again = tmp_path / "again"
    proc = run_cli("-q", "--target", "xnnpack", "--checkpoint", tiny_ckpt, "--out", again, "--recipe", TINY_RECIPE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("model.pte", "manifest.json", "tokenizer.json", "report.json"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_verify_and_run(bundle):
    out, _ = bundle
    proc = run_cli("verify", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "overall: PASS" in proc.stdout
    proc = run_cli(
        "run",
        out,
        "--prompt",
        "What is on the screen?",
        "--image",
        REPO / "tests/data/screen.png",
        "--max-new-tokens",
        "8",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()  # a random model says random things, but it says them


RUN_A_BUNDLE = """
import sys
from pathlib import Path

import torch

from autoglm_export.opened_bundle import open_bundle

manifest, rt, tok, pre = open_bundle(Path(sys.argv[1]))
emb = rt.token_embedding(torch.tensor([[1, 2]]))
rt.text_decoder(emb, torch.arange(2).expand(3, 2).contiguous(), torch.arange(2))
print(sorted(m for m in sys.modules if m.startswith(("executorch.exir", "executorch.runtime"))))
"""


def test_running_a_bundle_loads_no_compiler(bundle):
    """The host runtime uses ExecuTorch's bindings alone: ``executorch.runtime`` imports the whole
    ``exir`` compiler first, 2.5-3.5 s of every ``run`` / ``serve`` start."""
    out, _ = bundle
    proc = subprocess.run([sys.executable, "-c", RUN_A_BUNDLE, str(out)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_corrupted_bundle_is_refused(bundle, tmp_path):
    import shutil

    out, _ = bundle
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = bytearray((bad / "model.pte").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.pte").write_bytes(bytes(data))
    before = tree_snapshot(bad)
    for args in (("verify", bad), ("run", bad, "--prompt", "hi")):
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert "model.pte" in proc.stderr and "hash" in proc.stderr
    (bad / "manifest.json").write_text("{not json")
    proc = run_cli("run", bad, "--prompt", "hi")
    assert proc.returncode == 2 and "manifest.json" in proc.stderr
    assert tree_snapshot(bad).keys() == before.keys()


def test_force_replaces_and_ctrl_c_leaves_nothing(bundle, tiny_ckpt, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "manifest.json").write_text('{"format": "autoglm-export bundle"}')  # --force replaces bundles only
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "autoglm_export.cli",
            "--target",
            "xnnpack",
            "--checkpoint",
            str(tiny_ckpt),
            "--out",
            str(out),
            "--recipe",
            str(TINY_RECIPE),
            "--force",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    seen = ""
    deadline = time.time() + 300
    while "lower/xnnpack" not in seen and time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, seen + err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary directory left
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "old.txt"]  # the old output is untouched


def test_onnxruntime_gate_fails_on_a_wrong_bundle_output(bundle, tiny_ckpt):
    """The gate compares real outputs: a runtime whose vision output is off by 1% fails it."""

    from autoglm_export.bundle import load_bundle
    from autoglm_export.checkpoint import open_checkpoint
    from autoglm_export.components import Shapes
    from autoglm_export.host.image import ImagePreprocessing
    from autoglm_export.targets import get_target
    from autoglm_export.recipe import parse_recipe
    from autoglm_export.planning import plan_quantization
    from autoglm_export.verify import against_onnxruntime

    out, _ = bundle
    manifest = load_bundle(out)
    tgt = get_target("xnnpack")
    recipe = parse_recipe(manifest["recipe"]["content"], "manifest")
    ckpt = open_checkpoint(tiny_ckpt)
    plans = plan_quantization(recipe, ckpt, Shapes.from_recipe(recipe), "manifest")
    rt = tgt.open_runtime(out, manifest)
    real = rt.vision_encoder
    rt.vision_encoder = lambda px, method="vision_encoder": (
        real(px, method) * (1.01 if method == "vision_encoder" else 1)
    )
    pre = ImagePreprocessing.from_json(manifest["preprocessing"])
    report = against_onnxruntime(rt, ckpt, recipe, tgt, plans, pre, bundle=out, manifest=manifest)
    assert not report["passed"]
    assert "onnxruntime/vision_encoder_vs_bundle" in report["failed"]
    assert "onnxruntime/vision_encoder_vs_reference" not in report["failed"]
    assert not any("224x112" in f for f in report["failed"])  # the other bucket's method was left alone


def test_contract_check_catches_a_manifest_mismatch(bundle):
    import copy

    from autoglm_export.targets.shared.executorch import ExecuTorchRuntime, contract_check

    out, _ = bundle
    manifest = json.loads((out / "manifest.json").read_text())
    rt = ExecuTorchRuntime(out / "model.pte", 128, 16)
    assert contract_check(rt, manifest)["passed"]
    wrong = copy.deepcopy(manifest)
    wrong["shapes"]["max_context"] = 256
    wrong["components"]["audio_encoder"] = {}
    result = contract_check(rt, wrong)
    assert not result["passed"]
    assert result["mismatched"] == {"get_max_seq_len": 128, "get_max_context_len": 128}
    assert result["missing_methods"] == ["audio_encoder"]
