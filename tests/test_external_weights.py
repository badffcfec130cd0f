"""xnnpack with ``lowering.external_weights``: each program's weights in a .ptd beside its .pte."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from autoglm_export.bundle import program_data_files
from autoglm_export.errors import BundleError
from autoglm_export.targets.xnnpack import target as xnnpack
from conftest import REPO, run_cli


def _programs(bundle) -> list[dict]:
    m = json.loads((bundle / "manifest.json").read_text())
    out = []
    for comp in m["components"].values():
        out += comp.get("programs") or [comp]
    return out


def test_bundle_keeps_its_weights_in_data_files_and_passes_the_gates(xnnpack_ptd_bundle):
    b = xnnpack_ptd_bundle
    m = json.loads((b / "manifest.json").read_text())
    assert m["verification"]["passed"] is True and not m["verification"]["failed"]
    pairs = {(p["file"], p.get("data_file")) for p in _programs(b)}
    # model.pte (vision, token embedding) and the two one-layer decoder parts, each with its own .ptd
    assert pairs == {
        ("model.pte", "model.ptd"),
        ("text_decoder.00-00.pte", "text_decoder.00-00.ptd"),
        ("text_decoder.01-01.pte", "text_decoder.01-01.ptd"),
    }
    for pte, ptd in pairs:
        assert ptd in m["files"] and (b / ptd).read_bytes()[4:8] == b"FT01"  # FlatTensor, hashed like every file
    # the weights left the program: model.pte keeps the graphs, model.ptd the weight bytes the plan counts
    q = [m["components"][c]["quantization"] for c in ("vision_encoder", "token_embedding")]
    planned = sum(x["params"] * x["effective_bits_per_weight"] / 8 for x in q)  # 300 KB: 70 k fp32 ViT weights
    assert (b / "model.ptd").stat().st_size > 0.9 * planned > 2 * (b / "model.pte").stat().st_size


def test_run_loads_the_pairs_and_a_changed_data_file_is_refused(xnnpack_ptd_bundle, tmp_path):
    proc = run_cli(
        "run",
        xnnpack_ptd_bundle,
        "--prompt",
        "What is on the screen?",
        "--image",
        REPO / "tests/data/screen.png",
        "--max-new-tokens",
        "4",
    )
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]
    bad = tmp_path / "bad"
    shutil.copytree(xnnpack_ptd_bundle, bad)
    data = bytearray((bad / "text_decoder.01-01.ptd").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "text_decoder.01-01.ptd").write_bytes(bytes(data))
    proc = run_cli("run", bad, "--prompt", "hi")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "text_decoder.01-01.ptd" in proc.stderr and "hash" in proc.stderr


def test_a_data_file_must_be_one_the_manifest_hashes(xnnpack_ptd_bundle):
    m = json.loads((xnnpack_ptd_bundle / "manifest.json").read_text())
    assert len(program_data_files(xnnpack_ptd_bundle, m)) == 3
    m["components"]["vision_encoder"]["data_file"] = "../elsewhere.ptd"
    with pytest.raises(BundleError, match="components.vision_encoder.data_file"):
        program_data_files(xnnpack_ptd_bundle, m)


class _Lookup(torch.nn.Module):
    """A table the XNNPACK delegate does not take (an embedding), then a linear it does."""

    def __init__(self, dtype: torch.dtype, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.register_buffer("table", torch.randn(16, 8).to(dtype))
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, ids):
        return self.proj(torch.nn.functional.embedding(ids, self.table).float())


def _two_methods(tmp_path, name):
    """Two methods of one program whose tables share a name, with other dtypes and values."""
    modules = {"a": _Lookup(torch.float32, 0).eval(), "b": _Lookup(torch.float16, 1).eval()}
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    programs = {k: torch.export.export(m, (ids,), strict=True) for k, m in modules.items()}
    _, data = xnnpack._lower_to_pte(programs, {}, tmp_path / f"{name}.pte", lambda *_: None, external=True)
    assert data == f"{name}.ptd"
    return modules, ids


def _run(tmp_path, name, method, ids):
    import executorch.kernels.quantized  # noqa: F401
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(tmp_path / f"{name}.pte"), data_path=str(tmp_path / f"{name}.ptd"))
    return program.load_method(method).execute([ids])[0]


def test_methods_that_share_a_constant_name_each_load_their_own(tmp_path, monkeypatch):
    modules, ids = _two_methods(tmp_path, "ok")
    for k, m in modules.items():
        torch.testing.assert_close(_run(tmp_path, "ok", k, ids), m(ids))
    # byte-identical when lowered again (the bundle-level check is the xnnpack target's own test;
    # the .ptd adds only this serialization)
    (tmp_path / "again").mkdir()
    _two_methods(tmp_path / "again", "ok")
    for f in ("ok.pte", "ok.ptd"):
        assert (tmp_path / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
    # the same program with every such constant sent to the data file: the .ptd keys a constant by
    # name only, so one method gets the other's table (here a dtype mismatch the runtime rejects)
    monkeypatch.setattr(xnnpack, "_external_constant_tagger", lambda tag: lambda node: tag)
    _two_methods(tmp_path, "naive")
    with pytest.raises(RuntimeError):
        for k, m in modules.items():
            torch.testing.assert_close(_run(tmp_path, "naive", k, ids), m(ids))
