"""Our export-ready modules vs transformers' Glm4vForConditionalGeneration (fp32)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from reference import check_parity, load_hf, scale_random_init


def test_own_tiny_checkpoint_matches_transformers(tiny_ckpt):
    figures = check_parity(tiny_ckpt, tiny_ckpt)
    assert len(figures["ours_tokens"]) == 16


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


@pytest.fixture(scope="module")
def odd_shapes_ckpt(tmp_path_factory):
    """Written by transformers' own save_pretrained: 1 KV head, head_dim 24, vocab 509, fp32 shards."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    from autoglm_export.tiny import build_tokenizer, special_base

    vocab = 509
    base = special_base(vocab, False)
    cfg = Glm4vConfig(
        text_config=dict(
            hidden_size=72, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, intermediate_size=100,
            vocab_size=vocab, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                             "mrope_section": [2, 2, 2]},
        ),
        vision_config=dict(depth=1, hidden_size=48, num_heads=3, image_size=84, out_hidden_size=72, intermediate_size=80),
        image_token_id=base + 14, image_start_token_id=base + 10, image_end_token_id=base + 11,
        video_token_id=base + 15, video_start_token_id=base + 12, video_end_token_id=base + 13,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Glm4vForConditionalGeneration(cfg).eval()
    scale_random_init(model)
    out = tmp_path_factory.mktemp("odd") / "ckpt"
    model.save_pretrained(out, max_shard_size="200KB")
    (out / "tokenizer.json").write_text(build_tokenizer(vocab, False))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [base, base + 7, base + 9]}))
    return out


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
