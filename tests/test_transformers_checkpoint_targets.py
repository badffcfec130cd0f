"""Every target on the checkpoint transformers' own save_pretrained wrote (issue #29): 1 KV head,
head_dim 24, vocab 509 and an MLP width of 200, which no int4 group of 32 divides. The shipped
recipes must export it and pass their own gates."""

from __future__ import annotations

import json
import re

import pytest

from conftest import REPO, recipe_text, run_cli

# default recipes where they run in CI time; qnn's default (2048-slot cache, 336-px image) takes
# ~2 minutes on the HTP emulator, so qnn runs its CI recipe (the same rules, small shapes)
RECIPES = {
    "xnnpack": "xnnpack.yaml",
    "onnx": "onnx.yaml",
    "coreml": "coreml.yaml",
    "onnx-qnn": "onnx-qnn.yaml",
    "qnn": "qnn-tiny.yaml",
}
# the recipes as shipped but with their first (square) image bucket only, for CI time: each
# target's own bundle fixture exports and gates two buckets, except coreml's, so coreml keeps both here
TWO_BUCKETS = ("coreml",)


def first_bucket_only(src, dst):
    text = recipe_text(src)
    out = re.sub(r"^(  images: )\[(\[\d+, \d+\]), .*$", r"\1[\2]", text, count=1, flags=re.M)
    assert out != text, f"no two-bucket images line in {src}"
    dst.write_text(out)
    return dst


@pytest.mark.parametrize("target", list(RECIPES))
def test_target_exports_the_transformers_checkpoint(target, odd_shapes_ckpt, tmp_path):
    out = tmp_path / "bundle"
    recipe = REPO / "recipes" / RECIPES[target]
    if target not in TWO_BUCKETS:
        recipe = first_bucket_only(recipe, tmp_path / recipe.name)
    proc = run_cli("--target", target, "--checkpoint", odd_shapes_ckpt, "--out", out, "--recipe", recipe)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and not report["failed"]
    # every image bucket of the recipe is a vision method with its own passing gate
    manifest = json.loads((out / "manifest.json").read_text())
    buckets = [b["method"] for b in manifest["preprocessing"]["buckets"]]
    assert len(buckets) == (2 if target in TWO_BUCKETS else 1) and set(buckets) <= set(manifest["components"])
    for method in buckets:
        assert next(c for c in report["checks"] if c["name"] == f"{method}/lowered_vs_reference")["passed"]
    decoder = next(c for c in report["checks"] if c["name"] == "text_decoder/lowered_vs_reference")
    assert decoder["passed"] and decoder["sqnr_db"] >= decoder["threshold_db"]
    manifest = json.loads((out / "manifest.json").read_text())
    fallbacks = manifest["components"]["text_decoder"]["quantization"].get("int4_group_fallbacks", {})
    if target in ("xnnpack", "onnx"):
        # groups of 32 divide neither 72 nor 200: each such weight says what it got instead, and so does the output
        down = fallbacks["text_decoder.layers.0.mlp.down_proj.weight"]
        assert down["rule_group_size"] == 32 and down["in_features"] == 200
        assert (down["scheme"], down["group_size"]) == (("int8", None) if target == "xnnpack" else ("int4", "channel"))
        assert "int4 group 32 does not divide the input width (72, 200)" in proc.stderr
    else:  # per-channel recipes (coreml) and per-channel quantizers (qnn, onnx-qnn) need no fallback
        assert fallbacks == {}
