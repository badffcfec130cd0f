"""The one table of targets. The recipe schema, the quantization planner, the CLI, the pipeline
and the verifier read a target's facts here; its code lives in its own package and is imported
only when the target is used. Adding a target: a package under ``targets/`` and a row here
(docs/adding-a-target.md)."""

from __future__ import annotations

from .contract import Capabilities

_HTP_WEIGHTS = "keeps weights inside its QNN context binaries"

TARGETS: dict[str, Capabilities] = {
    row.name: row
    for row in (
        Capabilities(
            name="xnnpack",
            entry="autoglm_export.targets.xnnpack.target:XnnpackTarget",
            summary="ExecuTorch program, XNNPACK delegate (any arm64 phone's CPU)",
            # XNNPACK takes 4-bit weights only in groups that are multiples of 32
            quantizes_in_torch=True,
            decoder_in_parts=True,
            int4_groups_only=True,
        ),
        Capabilities(
            name="qnn",
            entry="autoglm_export.targets.qnn.target:QnnTarget",
            summary="ExecuTorch program, Qualcomm QNN HTP delegate (Snapdragon 8 Gen 3 / SM8650 NPU)",
            # QnnQuantizer quantizes 4-bit weights per output channel, whatever a rule's group_size says;
            # the decoder's calibration runs on the token embedding's and vision encoder's outputs, so a
            # decoder in parts comes after them (their model.pte is written first, nothing else is held)
            quantizes_in_torch=False,
            decoder_in_parts=True,
            decoder_parts_last=True,
            data_files=_HTP_WEIGHTS,
            calibrated=True,
            per_channel_int4=True,
            recipe_sections=("qnn",),
            own_reference=True,
        ),
        Capabilities(
            name="coreml",
            entry="autoglm_export.targets.coreml.target:CoreMLTarget",
            summary="Core ML packages (A17 Pro Neural Engine)",
            quantizes_in_torch=False,
            decoder_in_parts=True,
            data_files="keeps weights in each package's weight.bin",
            channel_int4_rules=True,
            load_dtype="fp16",
            own_reference=True,
        ),
        Capabilities(
            name="onnx",
            entry="autoglm_export.targets.onnx.target:OnnxTarget",
            summary="ONNX models for ONNX Runtime (CPU)",
            quantizes_in_torch=False,
            decoder_in_parts=True,
            data_files="always writes large weights as ONNX external data",
        ),
        Capabilities(
            name="onnx-qnn",
            entry="autoglm_export.targets.onnx_qnn.target:OnnxQnnTarget",
            summary="ONNX Runtime QNN EP context binaries (SM8650 NPU)",
            quantizes_in_torch=False,
            data_files=_HTP_WEIGHTS,
            calibrated=True,
            per_channel_int4=True,
            own_reference=True,
        ),
    )
}
