"""--target toy: the onnx lowering under another name, so that a test can register a target the
way a contributor would and export, verify, open and run a bundle with it."""

from __future__ import annotations

from autoglm_export.targets.onnx.target import OnnxTarget


class ToyTarget(OnnxTarget):
    runtime_name = "toy: onnxruntime (CPUExecutionProvider)"

    def versions(self) -> dict:
        return {**super().versions(), "toy": "1"}
