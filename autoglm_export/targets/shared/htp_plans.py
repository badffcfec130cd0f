"""Recipe rules a Qualcomm HTP can run, shared by the two HTP targets (qnn, onnx-qnn)."""

from __future__ import annotations

from ...errors import ExportError


def check_npu_plans(plans: dict, recipe_file: str) -> None:
    """Recipe rules an HTP can run: integer components (QDQ / PT2E, 16-bit activations) or fp16
    components, 4-bit only on linear (MatMul) weights."""
    for plan in plans.values():
        where = f"quantization (component {plan.component})"
        if plan.quantized and plan.dtype != "fp32":
            raise ExportError(
                "an HTP target cannot mix integer and fp16 rules in one component",
                file=recipe_file,
                field=where,
                expected="integer rules (QDQ, 16-bit activations) or all fp16",
                got=plan.dtype,
                fix="make the component's float rules fp32 (they become 8-bit QDQ weights) or drop its integer rules",
            )
        if not plan.quantized and plan.dtype != "fp16":
            raise ExportError(
                "the HTP has no fp32: a float component must be fp16",
                file=recipe_file,
                field=where,
                expected="fp16, or int8/int4 rules",
                got=plan.dtype,
                fix="use fp16 for this component",
            )
        for w in plan.weights.values():
            # a 4-bit embedding table is no smaller on the HTP: lowered through ExecuTorch's
            # QnnQuantizer (16a4w, per row) its context held 1.20 bytes per weight, 8-bit 1.17
            # (docs/benchmarks.md) — only the precision would drop
            if w.scheme == "int4" and (
                w.weight.startswith("token_embedding.") or not w.weight.endswith(".weight") or len(w.shape) != 2
            ):
                raise ExportError(
                    "4-bit weights only on MatMul weights for QNN",
                    file=recipe_file,
                    field=f"quantization[{w.rule}]",
                    expected="int4 on linear weights",
                    got=w.weight,
                    fix="use int8 for this weight",
                )
