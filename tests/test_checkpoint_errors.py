"""Bad input: one-line errors naming the file, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_one_line_error as _assert_one_line_error
from conftest import run_cli, tree_snapshot


def _index(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def _break(kind: str, d: Path) -> str:
    """Damage a checkpoint copy; return the text the error must name."""
    if kind == "missing_config":
        (d / "config.json").unlink()
        return "config.json"
    if kind == "unknown_architecture":
        cfg = json.loads((d / "config.json").read_text())
        cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
        (d / "config.json").write_text(json.dumps(cfg))
        return "architectures"
    if kind == "missing_shard":
        shard = sorted(set(_index(d)["weight_map"].values()))[1]
        (d / shard).unlink()
        return shard
    if kind == "truncated_shard":
        shard = d / sorted(set(_index(d)["weight_map"].values()))[0]
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 100])
        return "truncated"
    if kind == "wrong_shape":
        cfg = json.loads((d / "config.json").read_text())
        cfg["text_config"]["intermediate_size"] = 96  # shards were written for 128
        (d / "config.json").write_text(json.dumps(cfg))
        return "gate_up_proj"
    if kind == "missing_tokenizer":
        (d / "tokenizer.json").unlink()
        return "tokenizer.json"
    if kind == "escaping_shard_name":
        idx = _index(d)
        first = next(iter(idx["weight_map"]))
        idx["weight_map"][first] = "../../etc/passwd"
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
        return "escapes the checkpoint directory"
    raise AssertionError(kind)


KINDS = [
    "missing_config",
    "unknown_architecture",
    "missing_shard",
    "truncated_shard",
    "wrong_shape",
    "escaping_shard_name",
]


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_rejects_bad_checkpoint(kind, ckpt_copy):
    needle = _break(kind, ckpt_copy)
    before = tree_snapshot(ckpt_copy)
    proc = run_cli("inspect", ckpt_copy)
    _assert_one_line_error(proc, needle)
    assert tree_snapshot(ckpt_copy) == before


@pytest.mark.parametrize("kind", KINDS + ["missing_tokenizer"])
def test_export_rejects_bad_checkpoint_and_writes_nothing(kind, ckpt_copy, tmp_path):
    needle = _break(kind, ckpt_copy)
    out = tmp_path / "bundle"
    before = tree_snapshot(tmp_path)
    proc = run_cli("--target", "xnnpack", "--checkpoint", ckpt_copy, "--out", out)
    _assert_one_line_error(proc, needle)
    assert not out.exists()
    assert tree_snapshot(tmp_path) == before


def test_existing_output_is_refused(tiny_ckpt, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for args in (("tiny-checkpoint", out), ("--target", "xnnpack", "--checkpoint", tiny_ckpt, "--out", out)):
        _assert_one_line_error(run_cli(*args), str(out), "--force")
        assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_missing_checkpoint_directory(tmp_path):
    _assert_one_line_error(run_cli("inspect", tmp_path / "nope"), "not found")
