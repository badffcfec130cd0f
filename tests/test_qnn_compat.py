"""The QNN compatibility layer: ExecuTorch 1.5.1's Qualcomm backend (QNN 2.37 headers) lowering
for SM8650 and running on the HTP emulator with the onnxruntime-qnn wheel's QNN 2.51 libraries."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from autoglm_export.errors import BackendUnavailable
from autoglm_export.targets.qnn import libs as qnn_libs

LOWER_AND_RUN = r"""
import sys, torch
from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
from executorch.backends.qualcomm.utils.utils import (generate_htp_compiler_spec,
    generate_qnn_executorch_compiler_spec, to_edge_transform_and_lower_to_qnn)
from executorch.runtime import Runtime
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
x = torch.randn(1, 4, 32)
spec = generate_qnn_executorch_compiler_spec(soc_model=QcomChipset.SM8650, backend_options=generate_htp_compiler_spec(use_fp16=True))
buf = to_edge_transform_and_lower_to_qnn(m, (x,), spec).to_executorch().buffer
open(sys.argv[1], "wb").write(buf)
out = Runtime.get().load_program(sys.argv[1]).load_method("forward").execute([x])[0]
ref = m(x)
sqnr = 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()).item()
print("SQNR", round(sqnr, 1), "SOC", b"soc_type=SM8650;arch=75" in buf or b"soc_type=SM8650" in buf)
"""


def test_shim_is_built_and_forwards_only_the_provider_entry_point():
    shim = qnn_libs.shim_path()
    assert shim.is_file(), "make setup builds it"
    syms = subprocess.run(["nm", "-D", "--defined-only", str(shim)], capture_output=True, text=True).stdout
    assert [line.split()[-1] for line in syms.splitlines() if " T " in line] == ["QnnInterface_getProviders"]
    soname = subprocess.run(["objdump", "-p", str(shim)], capture_output=True, text=True).stdout
    assert "SONAME               libQnnHtp.so" in soname


def test_executorch_lowers_for_sm8650_and_runs_on_the_emulator(tmp_path):
    env, note = qnn_libs.qnn_environment()
    assert note["compat_layer"] and note["qnn_version"].startswith("2.51")
    pte = tmp_path / "small.pte"
    proc = subprocess.run(
        [sys.executable, "-c", LOWER_AND_RUN, str(pte)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SQNR")][-1].split()
    assert float(line[1]) >= 40 and line[3] == "True"  # fp16 on the HTP vs fp32 PyTorch; compiled for SM8650


def test_without_the_shim_the_subprocess_fails_and_the_error_names_both_ways(monkeypatch, tmp_path):
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    monkeypatch.setattr(qnn_libs, "shim_path", lambda: tmp_path / "missing" / "libQnnHtp.so")
    with pytest.raises(BackendUnavailable) as e:
        qnn_libs.qnn_environment()
    assert "QNN_SDK_ROOT" in str(e.value) and "make setup" in str(e.value)
    monkeypatch.setenv("QNN_SDK_ROOT", str(tmp_path))
    with pytest.raises(BackendUnavailable) as e:
        qnn_libs.qnn_environment()
    assert "lib/x86_64-linux-clang" in str(e.value)


def test_the_layout_conversion_is_needed():
    """Pointed straight at the 2.51 library, the same lowering fails: the layer is not decoration."""
    env, _ = qnn_libs.qnn_environment()
    env["LD_LIBRARY_PATH"] = env["LD_LIBRARY_PATH"].split(":", 1)[1]  # drop the compatibility layer
    proc = subprocess.run(
        [sys.executable, "-c", LOWER_AND_RUN, os.devnull], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode != 0 and "unknown custom config socModel 0" in proc.stderr
