"""Hostile and unusual inputs (issue #29): checkpoints, recipes, images, audio, prompts. Each is a
one-line error with exit code 2 (or is handled as transformers handles it), never a traceback."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, assert_one_line_error, one_bucket_recipe, run_cli


def _first_shard(d: Path) -> Path:
    return d / sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))[0]


def _edit_header(shard: Path, edit) -> None:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _tensors(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _overlap(h):
    a, b = _tensors(h)[:2]
    h[b]["data_offsets"] = [
        h[a]["data_offsets"][0],
        h[a]["data_offsets"][0] + (h[b]["data_offsets"][1] - h[b]["data_offsets"][0]),
    ]


def _float_offsets(h):
    k = _tensors(h)[0]
    h[k]["data_offsets"] = [float(x) + 0.5 for x in h[k]["data_offsets"]]


def _float_shape(h):
    k = _tensors(h)[0]
    h[k]["shape"] = [float(x) for x in h[k]["shape"]]


@pytest.mark.parametrize(
    "edit, needle",
    [(_overlap, "overlapping"), (_float_offsets, "non-negative integer"), (_float_shape, "non-negative integer")],
)
def test_crafted_safetensors_headers_are_one_line(edit, needle, ckpt_copy):
    _edit_header(_first_shard(ckpt_copy), edit)
    assert_one_line_error(run_cli("inspect", ckpt_copy), needle, ".safetensors")


def _poison(d: Path, key: str, value: float) -> None:
    """Set one element of a bf16 tensor in the shards to ``value``."""
    import torch

    shard = d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][key]
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    begin = json.loads(raw[8 : 8 + n])[key]["data_offsets"][0] + 8 + n
    raw[begin : begin + 2] = torch.tensor([value], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_named_while_loading(value, ckpt_copy, tmp_path):
    key = "model.language_model.layers.1.mlp.down_proj.weight"
    _poison(ckpt_copy, key, value)
    proc = run_cli(
        "--target",
        "onnx",
        "--checkpoint",
        ckpt_copy,
        "--out",
        tmp_path / "b",
        "-q",
        "--recipe",
        one_bucket_recipe(REPO / "recipes" / "onnx-tiny.yaml", tmp_path / "r.yaml"),
    )
    assert_one_line_error(proc, "non-finite", key)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "field, value", [("image_mean", "abc"), ("patch_size", 0), ("image_std", [1, 0, 1]), ("rescale_factor", None)]
)
def test_bad_preprocessor_config_is_one_line(field, value, ckpt_copy, tmp_path):
    pc_file = ckpt_copy / "preprocessor_config.json"
    pc = json.loads(pc_file.read_text())
    pc[field] = value
    pc_file.write_text(json.dumps(pc))
    proc = run_cli("--target", "xnnpack", "--checkpoint", ckpt_copy, "--out", tmp_path / "b")
    assert_one_line_error(proc, "preprocessor_config.json", field)


def test_hugging_face_cache_snapshot_is_accepted(tiny_ckpt, tmp_path):
    """models--ORG--NAME/snapshots/REV/* are symlinks into ../../blobs: the standard cache layout."""
    model = tmp_path / "hub" / "models--zai-org--AutoGLM-Phone-9B"
    blobs, snap = model / "blobs", model / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in tiny_ckpt.iterdir():
        blob = blobs / f"blob-{f.name}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    proc = run_cli("inspect", snap, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["weights_present"] and info["total_params"] > 0


@pytest.mark.parametrize(
    "name", ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json"]
)
def test_a_symlink_out_of_the_checkpoint_is_refused(name, ckpt_copy, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    target = ckpt_copy / name
    shutil.move(target, outside / target.name)
    target.symlink_to(outside / target.name)
    assert_one_line_error(run_cli("inspect", ckpt_copy), "outside the checkpoint directory", target.name)


def test_a_lone_symlinked_single_file_is_refused(ckpt_copy, tmp_path):
    from autoglm_export.errors import CheckpointError
    from autoglm_export.checkpoint import open_checkpoint

    single = tmp_path / "elsewhere.safetensors"
    single.write_bytes(b"")
    for f in ckpt_copy.glob("model*.safetensors*"):
        f.unlink()
    (ckpt_copy / "model.safetensors").symlink_to(single)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        open_checkpoint(ckpt_copy)


# ---- recipes --------------------------------------------------------------------------------


def test_yaml_alias_bomb_is_refused_quickly_and_briefly(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nname: *i\ntarget: xnnpack\n")
    assert bomb.stat().st_size < 600
    start = time.monotonic()
    err = assert_one_line_error(run_cli("recipes", "validate", bomb), "anchors")
    assert time.monotonic() - start < 60 and len(err) < 500


def test_long_values_are_quoted_in_bounded_excerpts(tmp_path):
    recipe = tmp_path / "long.yaml"
    recipe.write_text(f"name: x\ntarget: xnnpack\nshapes: {{image_size: '{'9' * 100000}'}}\n")
    err = assert_one_line_error(run_cli("recipes", "validate", recipe), "shapes.image_size")
    assert len(err) < 1000


def test_gates_that_cannot_fail_and_infinite_shapes_are_refused_together(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: x\ntarget: onnx\nshapes: {audio_seconds: .inf}\n"
        "parity: {quantized_sqnr_db: -.inf, float_sqnr_db: .nan, fp16_sqnr_db: -3}\n"
        "lowering: {external_weights: true}\n"
    )
    err = assert_one_line_error(run_cli("recipes", "validate", recipe), "5 problem(s)")
    for needle in ("audio_seconds", "quantized_sqnr_db", "float_sqnr_db", "fp16_sqnr_db", "external_weights"):
        assert needle in err


def test_catastrophic_pattern_does_not_hang_the_planner(tiny_ckpt, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        (REPO / "recipes" / "xnnpack-tiny.yaml")
        .read_text()
        .replace("quantization:\n", "quantization:\n  - {match: '(.*)*X', scheme: int8}\n", 1)
    )
    code = (
        "import sys; from autoglm_export.checkpoint import open_checkpoint; from autoglm_export.components import Shapes;"
        "from autoglm_export.recipe import load_recipe; from autoglm_export.planning import plan_quantization;"
        "r = load_recipe(sys.argv[2]); plan_quantization(r, open_checkpoint(sys.argv[1]), Shapes.from_recipe(r), sys.argv[2]);"
        "print('planned')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tiny_ckpt), str(recipe)], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0 and "planned" in proc.stdout, proc.stderr[-2000:]


def test_a_rule_that_matches_nothing_is_said(tiny_ckpt):
    from autoglm_export.checkpoint import open_checkpoint
    from autoglm_export.components import Shapes
    from autoglm_export.pipeline import report_plan_notes
    from autoglm_export.recipe import parse_recipe
    from autoglm_export.planning import plan_quantization

    rec = parse_recipe(
        {
            "name": "typo",
            "target": "xnnpack",
            "shapes": {"image_size": 112, "max_context": 128, "prefill_chunk": 16},
            "quantization": [{"match": r"text_decodr\..*_proj\.weight", "scheme": "int4", "group_size": 32}],
        },
        "typo.yaml",
    )
    said = []
    plans = plan_quantization(rec, open_checkpoint(tiny_ckpt), Shapes.from_recipe(rec), "typo.yaml")
    report_plan_notes(rec, plans, said.append)
    assert len(said) == 1 and "quantization[0]" in said[0] and "matches no weight" in said[0]


def test_every_rule_problem_is_reported_at_once(tiny_ckpt, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: x\ntarget: xnnpack\nshapes: {image_size: 112, max_context: 128, prefill_chunk: 16}\n"
        "quantization:\n  - {match: 'vision_encoder\\.blocks\\.0\\..*', scheme: fp16}\n"
        "  - {match: 'vision_encoder\\..*', scheme: fp32}\n"
        "  - {match: 'text_decoder\\.layers\\.0\\..*norm.*', scheme: fp16}\n"
        "  - {match: 'text_decoder\\.norm\\..*', scheme: fp32}\n"
    )
    err = assert_one_line_error(
        run_cli("--target", "xnnpack", "--checkpoint", tiny_ckpt, "--recipe", recipe, "--out", tmp_path / "b", "-q"),
        "2 problem(s)",
    )
    assert "component vision_encoder" in err and "component text_decoder" in err


# ---- images ---------------------------------------------------------------------------------


def _hf_pixels(image, size: int):
    """transformers' own processor on an image already S x S (no resize: the pixels compare exactly)."""
    from transformers import Glm4vImageProcessorPil

    proc = Glm4vImageProcessorPil(size={"shortest_edge": size * size, "longest_edge": 2 * size * size})
    ref = proc(images=[image], return_tensors="pt")["pixel_values"].numpy()
    return ref.reshape(ref.shape[0], 3, 2, -1)[:, :, 0].reshape(ref.shape[0], -1)  # one of the two equal frames


def test_exif_orientation_is_applied_as_transformers_does(tmp_path):
    from PIL import Image
    from transformers.image_utils import load_image as hf_load_image

    from autoglm_export.host.image import ImagePreprocessing, load_image, preprocess_image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: how phones store a portrait photo
    path = tmp_path / "phone.png"
    img.save(path, exif=exif)
    ours = preprocess_image(load_image(path), ImagePreprocessing(sizes=112))
    theirs = _hf_pixels(hf_load_image(str(path)), 112)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert not np.allclose(ours, preprocess_image(img, ImagePreprocessing(sizes=112)), atol=1e-3)


def test_transparency_is_composited_on_white_as_transformers_does(tmp_path):
    from PIL import Image

    from autoglm_export.host.image import ImagePreprocessing, load_image, preprocess_image

    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (112, 112, 4), dtype=np.uint8)
    rgba[:56, :, 3] = 0  # half the screenshot transparent, its hidden colour random
    img = Image.fromarray(rgba, "RGBA")
    path = tmp_path / "overlay.png"
    img.save(path)
    ours = preprocess_image(load_image(path), ImagePreprocessing(sizes=112))
    np.testing.assert_allclose(ours, _hf_pixels(img, 112), atol=1e-5)


def _png_header_only(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [20000, 8000])
def test_huge_images_are_refused_before_decoding(side, xnnpack_bundle, tmp_path):
    path = tmp_path / "huge.png"
    _png_header_only(path, side, side)
    assert_one_line_error(run_cli("run", xnnpack_bundle[0], "--prompt", "hi", "--image", path), "huge.png")


def test_non_finite_audio_samples_are_refused(tmp_path):
    import soundfile as sf

    from autoglm_export.errors import ExportError
    from autoglm_export.host.audio import AudioPreprocessing, load_audio

    wave = np.sin(np.linspace(0, 100, 16000)).astype(np.float32)
    wave[100] = np.nan
    wave[200] = np.inf
    path = tmp_path / "bad.wav"
    sf.write(path, wave, 16000, subtype="FLOAT")
    with pytest.raises(ExportError, match="non-finite"):
        load_audio(path, AudioPreprocessing(frames=320))


# ---- prompts --------------------------------------------------------------------------------


def test_prompt_from_standard_input_and_file(xnnpack_bundle, tmp_path):
    bundle = xnnpack_bundle[0]
    base = [sys.executable, "-m", "autoglm_export.cli", "run", str(bundle), "--max-new-tokens", "3"]
    via_arg = subprocess.run(base + ["--prompt", "What is on the screen?"], capture_output=True, text=True, cwd=REPO)
    via_stdin = subprocess.run(
        base + ["--prompt-file", "-"], input="What is on the screen?", capture_output=True, text=True, cwd=REPO
    )
    (tmp_path / "p.txt").write_text("What is on the screen?")
    via_file = subprocess.run(
        base + ["--prompt-file", str(tmp_path / "p.txt")], capture_output=True, text=True, cwd=REPO
    )
    assert via_arg.returncode == via_stdin.returncode == via_file.returncode == 0, via_stdin.stderr
    assert via_arg.stdout == via_stdin.stdout == via_file.stdout
    # over the argv limit (128 KiB) and over the bundle's context: a clear error, not E2BIG
    long = subprocess.run(base + ["--prompt-file", "-"], input="tap " * 50000, capture_output=True, text=True, cwd=REPO)
    assert_one_line_error(long, "max_context")


def test_special_token_text_in_a_prompt_is_text(tiny_ckpt):
    from autoglm_export.checkpoint import open_checkpoint

    tok = open_checkpoint(tiny_ckpt).chat_tokenizer()
    ids = tok.encode("look <|image|> and <|user|> here")
    assert not set(ids) & set(tok.special.values())
    assert tok.decode(ids) == "look <|image|> and <|user|> here"
