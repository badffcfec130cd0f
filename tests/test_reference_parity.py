"""Our export-ready modules vs transformers' Glm4vForConditionalGeneration (fp32)."""

from __future__ import annotations

import json
import shutil

import pytest

from reference import check_parity, load_hf


def test_own_tiny_checkpoint_matches_transformers(tiny_ckpt):
    figures = check_parity(tiny_ckpt, tiny_ckpt)
    assert len(figures["ours_tokens"]) == 16


@pytest.mark.parametrize("size", [(224, 112), (112, 168)], ids=["portrait", "landscape"])
def test_non_square_image_bucket_matches_transformers(tiny_ckpt, size):
    """Issue #30: a screen-shaped bucket: pixels equal Glm4vImageProcessor's for an image at the bucket's
    size, the vision tower interpolates its position table and rotary positions to the h x w grid as
    transformers does, and M-RoPE positions follow the non-square grid (greedy tokens equal)."""
    figures = check_parity(tiny_ckpt, tiny_ckpt, image_size=size)
    assert len(figures["ours_tokens"]) == 16


def test_non_square_bucket_on_a_transformers_written_checkpoint(odd_shapes_ckpt):
    check_parity(odd_shapes_ckpt, odd_shapes_ckpt, image_size=(196, 84))


def _flat_config(nested: dict) -> dict:
    """The legacy flat GLM-4.1V config.json: text fields at the top, rope in rope_scaling."""
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    text.pop("model_type", None)
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    flat.update(text)
    flat["rope_theta"] = rope["rope_theta"]
    flat["partial_rotary_factor"] = rope["partial_rotary_factor"]
    flat["rope_scaling"] = {"type": "default", "mrope_section": rope["mrope_section"]}
    return flat


def test_flat_config_keeps_partial_rotary_and_mrope(tiny_ckpt, tmp_path):
    flat_dir = tmp_path / "flat"
    shutil.copytree(tiny_ckpt, flat_dir)
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    (flat_dir / "config.json").write_text(json.dumps(_flat_config(cfg)))
    from autoglm_export.checkpoint import open_checkpoint

    spec = open_checkpoint(flat_dir).spec
    assert spec.config_form == "flat"
    assert spec.text.mrope_section == (1, 1, 2) and spec.text.partial_rotary_factor == 0.5
    # reference: transformers loading the nested form of the same weights
    check_parity(flat_dir, tiny_ckpt)


def test_save_pretrained_checkpoint_with_other_shapes(odd_shapes_ckpt):
    assert (odd_shapes_ckpt / "model.safetensors.index.json").is_file()
    check_parity(odd_shapes_ckpt, odd_shapes_ckpt)


def test_save_pretrained_checkpoint_in_flat_form(odd_shapes_ckpt, tmp_path):
    flat_dir = tmp_path / "flat"
    shutil.copytree(odd_shapes_ckpt, flat_dir)
    cfg = json.loads((odd_shapes_ckpt / "config.json").read_text())
    (flat_dir / "config.json").write_text(json.dumps(_flat_config(cfg)))
    check_parity(flat_dir, odd_shapes_ckpt)


def test_transformers_loads_the_tiny_checkpoint(tiny_ckpt):
    model = load_hf(tiny_ckpt)
    assert type(model).__name__ == "Glm4vForConditionalGeneration"
    assert model.config.text_config.rope_parameters["mrope_section"] == [1, 1, 2]
