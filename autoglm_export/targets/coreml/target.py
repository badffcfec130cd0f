"""--target coreml: one ``.mlpackage`` per component for the A17 Pro Neural Engine (iOS 18).

Each component is exported with ``torch.export`` at static shapes and converted by coremltools
(ML Program, FP16 compute). The token embedding and the text decoder are multifunction packages:
``prefill`` (``prefill_chunk`` tokens) and ``decode`` (1 token) share one copy of the weights; the
decoder's KV cache is Core ML state (``TextDecoderStateful``), so the app passes no cache.
Recipe rules become coremltools' own ``linear_quantize_weights``: INT4 per output channel by
default (what the Neural Engine runs), block-wise INT4 (``group_size: N``; GPU/CPU) or per-channel
INT8 as options; everything else FP16.

What Linux can check (``coreml_checks``): structure, op allow-list, which ops quantized constants
feed, finite constants, INT4/INT8 codes and scales bit for bit against ``coreml_quant``; and the
numerics of the program through ``coreml_mil.MilInterpreter`` (numpy), states carried between
calls. That is what the program means, not Core ML's kernels: on macOS ``verify`` runs Core ML's
own ``predict`` instead (``CoreMLPredictRuntime``).
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch

from ...bundle import part_file
from ...errors import ExportError
from ...methods import VISION_METHOD, is_vision_method
from ...models import family_of
from ...progress import silent
from ..contract import Target
from . import quant as coreml_quant
from .runtime import CoreMLPredictRuntime, MilRuntime
from .toolchain import import_coremltools

DEPLOYMENT = "iOS18"
MULTIFUNCTION = ("token_embedding", "text_decoder")
DEFAULT_FUNCTION = "decode"
# Memory model behind the up-front refusal (memory_fit.py): the exported fp16 programs of the
# components converted together are held until lowering (2 bytes per parameter), and converting one
# component or decoder part grows RSS by CONVERT_BYTES_PER_PARAM times its parameters (measured at
# 9B widths: docs/benchmarks.md). From an fp32 module it was over 26 (the 620.8 M-parameter token
# embedding took RSS from 8.2 GiB past 23 GiB before the OOM killer ended it).
HELD_BYTES_PER_PARAM = 2
CONVERT_BYTES_PER_PARAM = 6


def package_name(component: str) -> str:
    return f"{component}.mlpackage"


def function_names(component: str) -> list[str]:
    return ["prefill", "decode"] if component in MULTIFUNCTION else ["main"]


class _Fp32LayerNorm(torch.nn.LayerNorm):
    """layer_norm traced in fp32 inside an fp16 module: coremltools 9.0 lowers an fp16 layer_norm
    with an fp32 epsilon (type error); its fp16 pass casts the fp32 op back to fp16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = (None if t is None else t.float() for t in (self.weight, self.bias))
        return torch.nn.functional.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class _IntEmbedding(torch.nn.Module):
    """Core ML takes int32 token ids (no int64 inputs)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return self.inner.embed_tokens(input_ids).float()


class CoreMLTarget(Target):
    runtime_name = (
        "Core ML predict (macOS)"
        if platform.system() == "Darwin"
        else "MIL reference interpreter (numpy; program semantics, not Core ML kernels)"
    )

    def check_plans(self, plans: dict, recipe_file: str, parts: list | None = None) -> None:
        from ..shared.memory_fit import refuse_if_over_memory

        refuse_if_over_memory(
            "coreml",
            plans,
            held=HELD_BYTES_PER_PARAM,
            per_component=CONVERT_BYTES_PER_PARAM,
            how="converts each component (or decoder part) whole",
            parts=parts,
            fix="or lower the decoder in parts: recipe lowering.decoder_layers_per_program",
        )
        for plan in plans.values():
            fp32 = [w.weight for w in plan.weights.values() if w.scheme == "fp32"]
            if fp32:
                raise ExportError(
                    "the coreml target computes in fp16 (the Neural Engine has no fp32)",
                    file=recipe_file,
                    field=f"quantization (component {plan.component})",
                    expected="fp16 for every float weight",
                    got=f"fp32 for {fp32[0]}",
                    fix="add a final rule `- match: '.*'  scheme: fp16`",
                )
            for w in plan.weights.values():
                if w.scheme in ("int4", "int8") and len(w.shape) != 2:
                    raise ExportError(
                        "coreml quantizes 2-D linear and embedding weights only",
                        file=recipe_file,
                        field=f"quantization[{w.rule}]",
                        expected="a linear or embedding weight",
                        got=w.weight,
                        fix="exclude this weight with an earlier fp16 rule",
                    )

    # -- export: static torch.export graphs per Core ML function ---------------------------------

    def export(self, name: str, module: torch.nn.Module, prefill_chunk: int):
        # fp16 in PyTorch already: the program computes in fp16 either way (compute_precision), and
        # converting an fp32 graph cost ~30 bytes of RAM per parameter against ~4 for an fp16 one
        # (a 151552 x 256 embedding: +1.17 vs +0.16 GiB), which decides whether 9B converts in 24 GiB
        extra = {}
        if name == "text_decoder":  # from the fp32 frequencies, before the module goes to fp16
            from ...host.static_decoder import rope_table

            extra["rope"] = rope_table(module.inv_freq, module.axis_selector)
        family = family_of(module)
        module = module.half().eval()
        family.set_norm_mode(module, "scaled")  # overflow- and underflow-safe in fp16, epsilon included
        for m in module.modules():
            if type(m) is torch.nn.LayerNorm:
                m.__class__ = _Fp32LayerNorm
        graphs: dict[str, tuple] = {}
        with torch.no_grad():
            if is_vision_method(name) or name == "audio_encoder":
                (x,) = module.example_inputs()
                key, out = (
                    ("pixel_values", "image_embeddings")
                    if is_vision_method(name)
                    else ("input_features", "audio_embeddings")
                )
                graphs["main"] = (torch.export.export(module, (x,)), [(key, tuple(x.shape), np.float32)], [out])
                wrapped, prefix = module, ""
            elif name == "token_embedding":
                wrapped, prefix = _IntEmbedding(module), "inner."
                for fn, T in zip(function_names(name), (prefill_chunk, 1)):
                    ids = torch.zeros(1, T, dtype=torch.int32)
                    graphs[fn] = (
                        torch.export.export(wrapped, (ids,)),
                        [("input_ids", (1, T), np.int32)],
                        ["embeddings"],
                    )
            elif name == "text_decoder":
                wrapped, prefix = family.decoder_form("state", module).eval(), "decoder."
                t, C = module.t, module.max_context
                for fn, T in zip(function_names(name), (prefill_chunk, 1)):
                    args = (
                        torch.zeros(1, T, t.hidden_size),
                        torch.ones(1, 1, T, t.head_dim),
                        torch.zeros(1, 1, T, t.head_dim),
                        torch.zeros(1, 1, T, C),
                        torch.zeros(1, dtype=torch.int32),
                    )
                    spec = [
                        ("inputs_embeds", (1, T, t.hidden_size), np.float32),
                        ("cos", (1, 1, T, t.head_dim), np.float32),
                        ("sin", (1, 1, T, t.head_dim), np.float32),
                        ("mask", (1, 1, T, C), np.float32),
                        ("cache_start", (1,), np.int32),
                    ]
                    out = "logits" if module.has_head else "hidden_states"  # a part before the last
                    graphs[fn] = (torch.export.export(wrapped, args), spec, [out])
            else:
                raise KeyError(name)
        # converted constants are named after the parameter ("p_" + dotted name with "_"); this maps
        # them back to the recipe's weight names
        consts = {"p_" + n.replace(".", "_"): n.removeprefix(prefix) for n, _ in wrapped.named_parameters()}
        return {"graphs": graphs, "consts": consts, **extra}

    # -- lower: convert, quantize, package -------------------------------------------------------

    def lower(self, programs: dict, model_meta: dict, out_dir: Path, progress, plans: dict) -> dict:
        files, methods = [], {}
        buckets = [n for n in programs if is_vision_method(n)]
        if len(buckets) > 1:
            # one package with a function per image bucket, so the ViT's weights are written once
            # (a package per bucket held one more 1.8 GB copy at 9B per bucket)
            merged = {
                "graphs": {n: programs[n]["graphs"]["main"] for n in buckets},
                "consts": {k: v for n in buckets for k, v in programs[n]["consts"].items()},
            }
            label = f"{VISION_METHOD} ({len(buckets)} image buckets)"
            written, entry = self._package(
                merged, plans[buckets[0]], out_dir, package_name(VISION_METHOD), progress, label, buckets[0]
            )
            files += written
            methods.update({n: {**entry, "function": n} for n in buckets})
        for name, prog in programs.items():
            if name not in methods:
                written, methods[name] = self._package(prog, plans[name], out_dir, package_name(name), progress, name)
                files += written
        return {
            "files": files,
            "methods": methods,
            "manifest": {
                "coreml": {
                    "deployment_target": DEPLOYMENT,
                    "compute_precision": "float16",
                    "token_embedding": "its own multifunction package (prefill / decode)",
                    "image_buckets": "one package, a function per bucket method (components.<method>.function)",
                    "verified_here": (
                        "structure, op allow-list, quantized-constant consumers, finite constants, INT4/INT8 codes and "
                        "scales bit-exact vs the project's quantizer, numerics by the numpy MIL interpreter "
                        "(program semantics, not Core ML kernels)"
                    ),
                    "needs_macos": "Core ML predict with states, compilation to .mlmodelc, MLComputePlan (which ops run on the ANE), speed",
                }
            },
        }

    def lower_part(self, name: str, program, layers: tuple[int, int], out_dir: Path, progress, plan) -> dict:
        """One part of the decoder (``recipe.lowering``) as its own package (prefill / decode over
        the states of its own layers); the rotary table goes to the component's entry."""
        from ...quantize import ComponentPlan

        mine = set(program["consts"].values())
        part_plan = ComponentPlan(plan.component, plan.dtype, {n: w for n, w in plan.weights.items() if n in mine})
        file = part_file(name, layers, "mlpackage")
        files, entry = self._package(
            program, part_plan, out_dir, file, progress, f"{name} layers {layers[0]}..{layers[1] - 1}"
        )
        return {
            "files": files,
            "method": name,
            "layers": list(layers),
            **entry,
            "component": {"rope": entry.pop("rope")},
        }

    def _package(
        self, prog: dict, plan, out_dir: Path, file: str, progress, label: str, default_function: str = DEFAULT_FUNCTION
    ) -> tuple[list[str], dict]:
        """Convert, quantize and save one component's (or part's, or the image buckets') functions as
        ``file``; returns the files written and the manifest entry."""
        from .mil import MilProgram

        ct = import_coremltools()
        pkg = out_dir / file
        with tempfile.TemporaryDirectory(prefix="autoglm-coreml-") as tmp, _temp_files_in(tmp):
            parts = {}
            for fn, (ep, inputs, outputs) in prog["graphs"].items():
                progress(f"{label}/{fn}: coremltools conversion ({DEPLOYMENT}, fp16)")
                ml = _convert(ct, ep, inputs, outputs)
                configs = _quant_configs(ct, ml, prog["consts"], plan)
                if configs:
                    progress(f"{label}/{fn}: linear_quantize_weights on {len(configs)} weight(s)")
                    from coremltools.optimize.coreml import OptimizationConfig, linear_quantize_weights

                    ml = linear_quantize_weights(ml, OptimizationConfig(op_name_configs=configs))
                parts[fn] = Path(tmp) / f"{fn}.mlpackage"
                ml.save(str(parts[fn]))
                del ml
            if len(parts) > 1:
                from .multifunction import merge_functions

                progress(f"{label}: one multifunction package of {', '.join(parts)} (weights shared)")
                merge_functions(parts, pkg, default_function)
            else:
                shutil.copytree(parts["main"], pkg)
        _make_deterministic(pkg)
        progress(f"{label}: reading {file} back for the manifest")
        program = MilProgram(pkg, weights=False)  # ops and types only: the weights are gigabytes at 9B
        files = [str(p.relative_to(out_dir)) for p in sorted(pkg.rglob("*")) if p.is_file()]
        entry = {
            "file": file,
            "package": describe(program, prog["consts"], plan),
            **({"rope": prog["rope"]} if "rope" in prog else {}),
        }
        return files, entry

    # -- verification hooks --------------------------------------------------------------------

    def reference_component(self, name, plan, bundle, manifest, load):
        """The fp32 PyTorch module holding exactly the package's weights: fp16-rounded floats,
        INT4/INT8 weights as the project's quantizer dequantizes them (bit-exact with the bundle:
        ``weight_checks``)."""
        module = load()
        with torch.no_grad():
            for pname, p in module.named_parameters():
                w16 = p.detach().to(torch.float16).numpy()
                wp = plan.weights.get(pname)
                if wp is not None and wp.scheme in coreml_quant.BITS:
                    w16 = coreml_quant.dequantize(*coreml_quant.quantize(w16, wp.scheme, wp.group_size))
                p.copy_(torch.from_numpy(w16.astype(np.float32)))
        return module

    def checkpoint_checks(self, ckpt, shapes, plans, *, bundle: Path, manifest: dict, progress=silent) -> list[dict]:
        from .checks import weight_checks

        progress("checking the bundle's quantized weights against the checkpoint")
        return weight_checks(ckpt, shapes, plans, bundle, manifest)

    def contract_checks(self, runtime, manifest: dict) -> list[dict]:
        from .checks import structure_checks

        return structure_checks(runtime.programs, manifest)

    def open_runtime(self, bundle: Path, manifest: dict):
        if platform.system() == "Darwin":  # pragma: no cover - needs macOS (CI: .github/workflows/coreml-macos.yml)
            return CoreMLPredictRuntime(bundle, manifest)
        return MilRuntime(bundle, manifest)

    def versions(self) -> dict:
        from importlib.metadata import version

        return {p: version(p) for p in ("coremltools", "torch", "numpy")}


@contextlib.contextmanager
def _temp_files_in(path: str):
    """coremltools writes a temporary .mlpackage for every conversion and every quantization and
    removes them only when the process exits (atexit): 0.8-2 GB each at 9B widths, enough to fill
    the disk during an export in parts. Pointed at a scratch directory, they go with it."""
    before = tempfile.tempdir
    tempfile.tempdir = path
    try:
        yield
    finally:
        tempfile.tempdir = before


def _convert(ct, ep, inputs, outputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.convert(
            ep.run_decompositions({}),
            inputs=[ct.TensorType(name=n, shape=s, dtype=d) for n, s, d in inputs],
            outputs=[ct.TensorType(name=n) for n in outputs],
            minimum_deployment_target=getattr(ct.target, DEPLOYMENT),
            compute_precision=ct.precision.FLOAT16,
            skip_model_load=True,
        )


def _const_weight(op_name: str, consts: dict) -> str | None:
    # coremltools suffixes a constant it cast ("_to_fp16") or promoted to an op's input type
    return consts.get(op_name.removesuffix("_promoted_to_fp16").removesuffix("_to_fp16"))


def _quant_configs(ct, ml, consts: dict, plan) -> dict:
    from coremltools.optimize.coreml import OpLinearQuantizerConfig

    configs = {}
    for op in ml._mil_program.functions["main"].operations:
        if op.op_type != "const":
            continue
        weight = _const_weight(op.name, consts)
        wp = plan.weights.get(weight) if weight else None
        if wp is None or wp.scheme not in coreml_quant.BITS:
            continue
        per_channel = wp.scheme == "int8" or wp.group_size in (None, "channel")
        configs[op.name] = OpLinearQuantizerConfig(
            mode="linear_symmetric",
            dtype=wp.scheme,
            weight_threshold=0,
            granularity="per_channel" if per_channel else "per_block",
            **({} if per_channel else {"block_size": int(wp.group_size)}),
        )
    planned = {n for n, w in plan.weights.items() if w.scheme in coreml_quant.BITS}
    found = {_const_weight(n, consts) for n in configs}
    if planned - found:
        raise RuntimeError(
            f"{plan.component}: planned quantized weights with no constant in the converted program: "
            f"{sorted(planned - found)[:5]}"
        )
    return configs


def _make_deterministic(pkg: Path) -> None:
    """Same checkpoint and recipe, same bytes: coremltools names package items with random UUIDs
    (derived here from the item paths instead) and serialises protobuf maps in an order that
    varies between processes (re-serialised with sorted keys; the message is unchanged). Its
    ``executorch_debug_handle_mapping.json`` is a debugging aid outside the package's items."""
    from coremltools.proto import Model_pb2

    (pkg / "executorch_debug_handle_mapping.json").unlink(missing_ok=True)
    path = pkg / "Manifest.json"
    data = json.loads(path.read_text())
    renamed = {
        old: str(uuid.uuid5(uuid.NAMESPACE_URL, "autoglm-export/" + e["path"])).upper()
        for old, e in data["itemInfoEntries"].items()
    }
    data["itemInfoEntries"] = {renamed[k]: v for k, v in data["itemInfoEntries"].items()}
    data["rootModelIdentifier"] = renamed[data["rootModelIdentifier"]]
    path.write_text(json.dumps(data, indent=4, sort_keys=True) + "\n")
    root = pkg / "Data" / data["itemInfoEntries"][data["rootModelIdentifier"]]["path"]
    spec = Model_pb2.Model()
    spec.ParseFromString(root.read_bytes())
    root.write_bytes(spec.SerializeToString(deterministic=True))


def describe(program, consts: dict, plan) -> dict:
    """The manifest's record of one package: per function its inputs, outputs, states and op
    counts, and every quantized weight with its scheme and bits."""
    functions = {}
    quantized = {}
    for fname, f in sorted(program.functions.items()):
        ops: dict[str, int] = {}
        for op in f.ops:
            ops[op.type] = ops.get(op.type, 0) + 1
            if op.type == "constexpr_blockwise_shift_scale":
                weight = _const_weight(op.name.removesuffix("_quantized"), consts)
                wp = plan.weights[weight]
                quantized[op.name] = {
                    "weight": wp.weight,
                    "scheme": wp.scheme,
                    "granularity": "per_channel"
                    if wp.scheme == "int8" or wp.group_size in (None, "channel")
                    else "per_block",
                    "block_size": None
                    if wp.group_size in (None, "channel") or wp.scheme == "int8"
                    else int(wp.group_size),
                    "bits_per_weight": round(coreml_quant.effective_bits(wp.scheme, wp.shape, wp.group_size), 4),
                }
        inputs = {n: t.to_json() for n, t in f.inputs.items() if not t.state}
        states = {n: t.to_json() for n, t in f.inputs.items() if t.state}
        outputs = {}
        for op in f.ops:
            for oname, t in op.outputs:
                if oname in f.outputs:
                    outputs[oname] = t.to_json()
        functions[fname] = {"inputs": inputs, "outputs": outputs, "states": states, "ops": dict(sorted(ops.items()))}
    return {
        "functions": functions,
        "quantized_weights": dict(sorted(quantized.items())),
        "default_function": program.description()["default_function"],
    }
