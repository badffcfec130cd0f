"""Tiny checkpoints are deterministic; inspect reports the real 9B figures from config alone."""

from __future__ import annotations

import json
import shutil

import torch

from autoglm_export.components import Shapes
from autoglm_export.load import build_on_meta
from autoglm_export.models import family_for_config
from autoglm_export.tiny import write_tiny_checkpoint
from conftest import DATA, run_cli

REAL_PARAMS = 10_292_777_472
REAL_VISION_PARAMS = 892_498_432


def _bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = _bytes(write_tiny_checkpoint(tmp_path / "a", seed=3))
    b = _bytes(write_tiny_checkpoint(tmp_path / "b", seed=3))
    c = _bytes(write_tiny_checkpoint(tmp_path / "c", seed=4))
    assert a == b
    shards = [n for n in a if n.endswith(".safetensors")]
    assert len(shards) >= 2  # sharded, with an index
    assert any(a[n] != c[n] for n in shards)
    assert a["config.json"] == c["config.json"]


def test_tokenizer_specials_sit_at_config_ids(tiny_ckpt):
    from tokenizers import Tokenizer

    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    assert tok.token_to_id("<|image|>") == cfg["image_token_id"]
    assert tok.token_to_id("<|begin_of_image|>") == cfg["image_start_token_id"]
    # like the real model, the embedding table may be larger than the tokenizer
    assert tok.get_vocab_size() <= cfg["text_config"]["vocab_size"]


def test_real_9b_config_builds_on_meta():
    config = json.loads((DATA / "glm41v_9b_config.json").read_text())
    family = family_for_config(config, DATA / "glm41v_9b_config.json")  # by model_type 'glm4v'
    spec = family.parse_config(config, DATA / "glm41v_9b_config.json")
    assert spec.text.rotary_dim == 64 and spec.text.head_dim == 128
    total = 0
    for comp in family.components.for_spec(spec):
        module = build_on_meta(lambda c=comp: c.build(spec, Shapes()))
        n = sum(p.numel() for p in module.parameters())
        assert all(p.device.type == "meta" for p in module.parameters())
        if comp.name == "vision_encoder":
            # the learned 576x1536 position table becomes a baked buffer, and the Conv3d's two
            # temporal kernel slices are summed into one Conv2d kernel
            assert n == REAL_VISION_PARAMS - 576 * 1536 - 1536 * 3 * 14 * 14
        else:
            assert n == sum(torch.Size(s).numel() for s in comp.keys(spec).values())
        total += sum(torch.Size(s).numel() for s in comp.keys(spec).values())
    assert total == REAL_PARAMS


def test_inspect_reports_real_parameter_count_from_config_only(tmp_path):
    d = tmp_path / "glm41v-9b"
    d.mkdir()
    shutil.copy(DATA / "glm41v_9b_config.json", d / "config.json")
    proc = run_cli("inspect", d, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["architecture"] == "Glm4vForConditionalGeneration"
    assert info["total_params"] == REAL_PARAMS
    assert info["components"]["vision_encoder"]["params"] == REAL_VISION_PARAMS
    assert set(info["components"]) == {"vision_encoder", "token_embedding", "text_decoder"}
    assert 5.0e9 < info["int4_bytes_est"] < 6.5e9


def test_inspect_human_output(tiny_ckpt):
    proc = run_cli("inspect", tiny_ckpt)
    assert proc.returncode == 0, proc.stderr
    assert "text_decoder" in proc.stdout and "BF16" in proc.stdout and "nested" in proc.stdout


def test_single_file_checkpoint_reads_the_same_tensors(tiny_ckpt, tmp_path):
    """A checkpoint with one model.safetensors (no index) reads exactly like the sharded one."""
    from safetensors.torch import save_file

    from autoglm_export.checkpoint import open_checkpoint

    sharded = open_checkpoint(tiny_ckpt)
    single = tmp_path / "single"
    single.mkdir()
    for f in ("config.json", "generation_config.json", "tokenizer.json", "preprocessor_config.json"):
        shutil.copy(tiny_ckpt / f, single / f)
    save_file(
        {k: sharded.tensor(k) for k in sharded.tensors}, str(single / "model.safetensors"), metadata={"format": "pt"}
    )
    ckpt = open_checkpoint(single)
    assert {i.file.name for i in ckpt.tensors.values()} == {"model.safetensors"}
    for key in sharded.tensors:
        a, b = sharded.tensor(key), ckpt.tensor(key)
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
