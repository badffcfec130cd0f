"""Linux checks of Core ML packages: what can be proven without Core ML (docs/proven.md).

* ``structure_checks``: functions, inputs, outputs, states with shapes and dtypes as the
  manifest records them, no symbolic dimension; every op in the Neural Engine allow-list (no
  Conv3d); quantized constants feed only the ops they should (linear weights, the embedding's
  gather: never a mask or a rotary table); no NaN or infinity in any constant.
* ``weight_checks``: every INT4/INT8 weight decoded from ``weight.bin`` by ``coreml_mil`` is
  compared bit for bit, codes and fp16 scales, with ``coreml_quant`` applied to the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Ops of our packages that the A17 Pro Neural Engine executes in fp16 (Apple's ANE guidance and
# ExecuTorch's examples/apple/coreml/llama); state reads/writes and constants are not compute.
# MLComputePlan on macOS is what proves placement; this list keeps unknown ops out.
ANE_OPS = frozenset(
    {
        "const",
        "constexpr_blockwise_shift_scale",
        "read_state",
        "write_state",
        "cast",
        "linear",
        "matmul",
        "conv",
        "add",
        "sub",
        "mul",
        "real_div",
        "maximum",
        "minimum",
        "abs",
        "square",
        "sqrt",
        "rsqrt",
        "exp",
        "silu",
        "sigmoid",
        "gelu",
        "tanh",
        "relu",
        "softmax",
        "layer_norm",
        "reduce_max",
        "reduce_mean",
        "reduce_sum",
        "reshape",
        "transpose",
        "expand_dims",
        "squeeze",
        "tile",
        "concat",
        "split",
        "slice_by_index",
        "slice_by_size",
        "slice_update",
        "gather",
        "shape",  # shape: of a static tensor, folded by the compiler
    }
)
QUANT_OPS = ("constexpr_blockwise_shift_scale",)
# which op may take a quantized constant, and as which input
QUANT_CONSUMERS = {("linear", "weight"), ("gather", "x")}


def _entry(name: str, ok: bool, detail: str) -> dict:
    return {"name": name, "kind": "contract", "gated": True, "passed": bool(ok), "detail": detail}


def _consumers(function) -> dict[str, list[tuple[str, str]]]:
    uses: dict[str, list[tuple[str, str]]] = {}
    for op in function.ops:
        for key, bindings in op.inputs.items():
            for kind, b in bindings:
                if kind == "var":
                    uses.setdefault(b, []).append((op.type, key))
    return uses


def _index_bookkeeping(op, declared: dict, function) -> bool:
    """Integer-only arithmetic (slice starts, the gather's negative-index fix-up): index
    bookkeeping that Core ML resolves around the Neural Engine's fp16 tensor compute."""
    types = [t for _, t in op.outputs]
    for bindings in op.inputs.values():
        for kind, b in bindings:
            if kind == "var":
                types.append(declared.get(b) or function.inputs.get(b))
    return all(t is not None and t.dtype in ("int32", "int16", "bool") for t in types)


def _input_shape(op, key: str, declared: dict) -> tuple:
    kind, b = op.inputs[key][0]
    return tuple(b.shape) if kind == "value" else tuple(declared[b].shape)


def structure_checks(programs: dict, manifest: dict) -> list[dict]:
    """``programs``: MilProgram per package label (``runtime.package_records``)."""
    from .runtime import package_records

    records = {label: entry["package"] for label, _, entry in package_records(manifest)}
    checks = []
    for name, program in programs.items():
        record = records[name]
        problems, bad_ops, bad_quant, nonfinite = [], set(), [], []
        expected_quant = set(record["quantized_weights"])
        quant_sets = []
        if sorted(program.functions) != sorted(record["functions"]):
            problems.append(f"functions {sorted(program.functions)} != manifest {sorted(record['functions'])}")
        if program.description()["default_function"] != record["default_function"]:
            problems.append("default function differs from the manifest")
        for fname, f in program.functions.items():
            want = record["functions"].get(fname, {})
            got_inputs = {n: t.to_json() for n, t in f.inputs.items() if not t.state}
            got_states = {n: t.to_json() for n, t in f.inputs.items() if t.state}
            for what, got, exp in (
                ("inputs", got_inputs, want.get("inputs")),
                ("states", got_states, want.get("states")),
            ):
                if got != exp:
                    problems.append(f"{fname} {what} {got} != manifest {exp}")
            for n, t in f.inputs.items():
                if None in t.shape:
                    problems.append(f"{fname} input {n} has a symbolic dimension")
            declared = {o: t for op in f.ops for o, t in op.outputs}
            for o in f.outputs:
                if o not in want.get("outputs", {}) or declared[o].to_json() != want["outputs"][o]:
                    problems.append(f"{fname} output {o} differs from the manifest")
                if None in declared[o].shape:
                    problems.append(f"{fname} output {o} has a symbolic dimension")
            uses = _consumers(f)
            quant_sets.append({op.name for op in f.ops if op.type in QUANT_OPS})
            for op in f.ops:
                if op.type not in ANE_OPS and not _index_bookkeeping(op, declared, f):
                    bad_ops.add(op.type)
                if op.type == "conv" and len(_input_shape(op, "weight", declared)) > 4:
                    bad_ops.add("conv3d")  # the Neural Engine has no 3-D convolution
                if op.type in QUANT_OPS:
                    out = op.outputs[0][0]
                    wrong = [u for u in uses.get(out, []) if u not in QUANT_CONSUMERS]
                    if wrong or not uses.get(out):
                        bad_quant.append(f"{out} -> {wrong or 'nothing'}")
                values = list(op.inputs.items())
                if "val" in op.attributes:
                    values.append(("val", [("value", op.attributes["val"])]))
                for key, bindings in values:
                    for kind, v in bindings:
                        if (
                            kind == "value"
                            and isinstance(v, np.ndarray)
                            and v.dtype.kind == "f"
                            and not np.isfinite(v).all()
                        ):
                            nonfinite.append(f"{op.name}.{key}")
        checks.append(
            _entry(
                f"coreml/{name}/structure",
                not problems,
                "functions, inputs, outputs, states, shapes, dtypes as the manifest; no symbolic dims"
                if not problems
                else "; ".join(problems)[:300],
            )
        )
        checks.append(
            _entry(
                f"coreml/{name}/ane_ops",
                not bad_ops,
                f"{sum(len(f.ops) for f in program.functions.values())} ops "
                "in the Neural Engine allow-list (integer index arithmetic aside)"
                if not bad_ops
                else f"ops outside the allow-list: {sorted(bad_ops)}",
            )
        )
        ok_quant = not bad_quant and all(q == expected_quant for q in quant_sets)
        checks.append(
            _entry(
                f"coreml/{name}/quantized_constants",
                ok_quant,
                f"{len(expected_quant)} quantized constant(s) per function, each feeding only linear weights "
                "or the embedding gather"
                if ok_quant
                else f"per function {[len(q) for q in quant_sets]}, manifest {len(expected_quant)}; misused: {bad_quant[:3]}",
            )
        )
        checks.append(
            _entry(
                f"coreml/{name}/finite_constants",
                not nonfinite,
                "no NaN or infinity in any constant" if not nonfinite else f"non-finite: {nonfinite[:3]}",
            )
        )
    return checks


def weight_checks(ckpt, shapes, plans: dict, bundle: Path, manifest: dict) -> list[dict]:
    """INT4/INT8 codes and scales in weight.bin vs the project's quantizer on the checkpoint."""
    import torch

    from ...load import build_on_meta, load_component
    from . import quant as coreml_quant
    from .mil import MilProgram

    from .runtime import package_records

    checks = []
    for name in manifest["components"]:
        wanted, packed = {}, {}
        for _, _, entry in (r for r in package_records(manifest) if r[1] == name):  # a decoder in parts: every part
            mine = entry["package"]["quantized_weights"]
            if not mine:
                continue
            wanted.update(mine)
            for f in MilProgram(bundle / entry["file"]).functions.values():
                for op in f.ops:
                    if op.type == "constexpr_blockwise_shift_scale" and op.name in mine:
                        packed[op.name] = (op.inputs["data"][0][1], op.inputs["scale"][0][1], op.inputs.get("offset"))
        if not wanted:
            continue
        c = ckpt.family.components.get(name)
        module = load_component(build_on_meta(lambda c=c: c.build(ckpt.spec, shapes)), ckpt, torch.float32)
        params = dict(module.named_parameters())
        total = exact = 0
        bad = []
        for op_name, info in wanted.items():
            weight = info["weight"].split(".", 1)[1]
            wp = plans[name].weights[weight]
            codes, scale = coreml_quant.quantize(
                params[weight].detach().to(torch.float16).numpy(), wp.scheme, wp.group_size
            )
            if op_name not in packed:
                bad.append(f"{op_name}: not in the package")
                continue
            data, s, offset = packed[op_name]
            same = (
                offset is None
                and data.shape == codes.shape
                and s.shape == scale.shape
                and s.dtype == np.float16
                and np.array_equal(data.astype(np.int8), codes)
                and np.array_equal(s.view(np.uint16), scale.view(np.uint16))
            )
            total += 1
            exact += int(same)
            if not same:
                bad.append(op_name)
        del module, params
        checks.append(
            _entry(
                f"coreml/{name}/int_weights_bit_exact",
                total == len(wanted) and exact == total,
                f"{exact}/{len(wanted)} weights: codes and fp16 scales identical to the project's quantizer"
                + (f"; differ: {bad[:3]}" if bad else ""),
            )
        )
    return checks
