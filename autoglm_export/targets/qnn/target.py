"""--target qnn: ExecuTorch with the Qualcomm QNN HTP delegate, compiled for SM8650 (HTP v75).

Every component becomes the static graphs of ``static_graphs`` (encoders; token embedding and
text decoder as a prefill graph of ``prefill_chunk`` tokens and a decode graph of one token,
the decoder in the host-cache form), each a method of one ``model.pte``; a decoder lowered in parts
(recipe ``lowering``) is one ``.pte`` per part with the same two methods, each part calibrated on
what the part before it computed. Components with integer
recipe rules are quantized with ExecuTorch's ``QnnQuantizer`` (PT2E): 16-bit activations and
8-bit per-channel weights by default, 4-bit per-channel on the linears an ``int4`` rule names
(16a4w); ``fp16`` components are compiled for the HTP's fp16 path. Lowering uses the QNN
libraries of ``qnn_libs`` (a QNN SDK, or the onnxruntime-qnn wheel through the compatibility
layer); the ``.pte`` runs on the x86 HTP emulator through ExecuTorch's C++ runtime.

"The same quantization in PyTorch" is the PT2E-converted graph (fake-quantized) of each method,
rebuilt deterministically from the checkpoint with the same calibration data.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ...bundle import REPORT
from ...errors import BackendUnavailable, ExportError
from ...models import family_of
from ..contract import Target
from ..shared.executorch import ExecuTorchRuntime, contract_check, load_program, metadata_methods, quiet_native_output
from ..shared.export_caches import release_export_caches
from ..shared.static_graphs import (
    ComponentAdapter,
    StaticGraphRuntime,
    graph_entries,
    graph_key,
    graph_names,
    static_graphs,
)
from .contexts import HTP_CONTEXT_LIMIT, plan_contexts
from .simulation import fetch_attr, lean_simulation

PTE = "model.pte"
SOC_NAME, SOC_MODEL, HTP_ARCH = "SM8650", 57, 75
_preloaded: dict | None = None


def preload_qnn_libraries() -> dict:
    """Load the QNN libraries into this process by soname, before ExecuTorch's Qualcomm backend
    dlopens them by name (the loader reads LD_LIBRARY_PATH only at start-up). Not to be mixed with
    ONNX Runtime's QNN EP in one process."""
    global _preloaded
    if _preloaded is not None:
        return _preloaded
    from .libs import REAL_LIBRARY_ENV, qnn_environment

    env, note = qnn_environment()
    dirs = [d for d in env["LD_LIBRARY_PATH"].split(":") if d]
    if note["compat_layer"]:
        os.environ[REAL_LIBRARY_ENV] = env[REAL_LIBRARY_ENV]
    os.environ.setdefault("QNN_SDK_ROOT", env.get("QNN_SDK_ROOT", ""))
    for lib in ("libQnnHtp.so", "libQnnSystem.so"):
        path = next((Path(d) / lib for d in dirs if (Path(d) / lib).is_file()), None)
        if path is None:
            raise BackendUnavailable(f"{lib} not found in {dirs}", fix="set QNN_SDK_ROOT, or run make setup")
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    _preloaded = note
    return note


# Up-front memory refusal (memory_fit.py): bytes per parameter of the exported programs held until
# lowering and of lowering one component or decoder part, lower bounds fitted to bench/scale's runs at
# the 9B shape, in parts and whole (the qnn rows and their notes in docs/benchmarks.md)
HELD_BYTES_PER_PARAM = 2
LOWER_BYTES_PER_PARAM = 12
QNN_CONTEXT_MAGIC = bytes.fromhex("cdab7856")  # 0x5678abcd, little-endian: ExecuTorch's QNN context header


def pin_context_signatures(buf: bytes) -> bytes:
    """ExecuTorch stamps each QNN context header with the wall-clock time (an int64 "signature"
    after the magic), so two exports of the same model differ. Replace each by a value derived
    from the program itself: still unique per program, now reproducible."""
    import hashlib

    spots, i = [], buf.find(QNN_CONTEXT_MAGIC)
    while i >= 0:
        spots.append(i + 4)
        i = buf.find(QNN_CONTEXT_MAGIC, i + 1)
    if not spots:
        return buf
    out = bytearray(buf)
    for at in spots:
        out[at : at + 8] = bytes(8)
    digest = hashlib.sha256(bytes(out)).digest()
    for n, at in enumerate(spots):
        value = int.from_bytes(digest[:7], "little") + n  # positive int64, distinct per context
        out[at : at + 8] = value.to_bytes(8, "little")
    return bytes(out)


def _compiler_spec(fp16: bool, weight_sharing: bool = False, multi_contexts: bool = False):
    from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
    from executorch.backends.qualcomm.utils.utils import (
        generate_htp_compiler_spec,
        generate_qnn_executorch_compiler_spec,
    )

    htp = generate_htp_compiler_spec(
        use_fp16=fp16, use_weight_sharing=weight_sharing, use_multi_contexts=multi_contexts
    )
    return generate_qnn_executorch_compiler_spec(soc_model=QcomChipset.SM8650, backend_options=htp)


def _lower_group(modules: dict, args: dict, fp16: bool, ctx, plan):
    """The graphs of one component (prefill and decode together: partition i of every graph
    becomes context i) through ExecuTorch's QNN lowering, cut into ``ctx``'s contexts."""
    from unittest import mock

    import executorch.backends.qualcomm.utils.utils as qnn_utils

    from .contexts import group_partitioner, units_by_module

    spec = _compiler_spec(fp16, ctx.weight_sharing, multi_contexts=len(ctx.groups) > 1)
    units = units_by_module(plan)
    # to_edge_transform_and_lower_to_qnn builds its own QnnPartitioner; ours tags the same nodes
    # and only adds the context cuts. It also exports each graph again, with strict=True: dynamo's
    # capture clones every weight (see quantize_graph). Non-strict export keeps the module paths of a
    # PT2E-converted graph's nodes, which the context cuts read.
    with (
        mock.patch.object(qnn_utils, "QnnPartitioner", lambda specs, **kw: group_partitioner(specs, ctx, units)),
        mock.patch.object(torch.export, "export", _non_strict(torch.export.export)),
    ):
        with quiet_native_output(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return qnn_utils.to_edge_transform_and_lower_to_qnn(modules, args, spec)


def _non_strict(export):
    def non_strict_export(*args, **kwargs):
        return export(*args, **{**kwargs, "strict": False})

    return non_strict_export


def _emit(programs: dict, meta: dict) -> bytes:
    """One .pte from the lowered programs of every component, with the runner metadata."""
    from executorch.backends.qualcomm.utils.utils import qnn_edge_config
    from executorch.exir import EdgeProgramManager

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = EdgeProgramManager(programs, constant_methods=meta, compile_config=qnn_edge_config())
        return pin_context_signatures(manager.to_executorch().buffer)


def _linear_module_paths(graph_module) -> dict:
    """linear node -> the module path of its weight (``decoder.layers.0.self_attn.q_proj``)."""
    out = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and "linear" in str(node.target) and len(node.args) > 1:
            w = node.args[1]
            if getattr(w, "op", None) == "get_attr":
                out[node] = w.target.rsplit(".", 1)[0]
    return out


def quantize_graph(spec, plan) -> torch.nn.Module:
    """PT2E with QnnQuantizer: 16a8w by default, 16a4w on the linears an int4 rule names."""
    from executorch.backends.qualcomm.quantizer.quantizer import ModuleQConfig as QConfig
    from executorch.backends.qualcomm.quantizer.quantizer import QnnQuantizer, QuantDtype
    from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    # non-strict: strict export (dynamo) clones every weight it captures into a cache of real values
    # and holds up to three times the component's fp32 weights while tracing (+6.9 GiB for the 9B
    # token embedding's 2.3 GiB table, measured); these graphs hold no state that needs dynamo
    gm = torch.export.export(spec.module, spec.args, strict=False).module()
    host_cache_form = family_of(spec.module).decoder_forms["host_cache"]
    prefix = "decoder." if isinstance(spec.module, host_cache_form) else ""  # the wrapper's attribute name
    int4 = {n.rsplit(".", 1)[0] for n, w in plan.weights.items() if w.scheme == "int4"}
    four_bit = {
        node.name: path.removeprefix(prefix)
        for node, path in _linear_module_paths(gm).items()
        if path.removeprefix(prefix) in int4
    }
    found = set(four_bit.values())
    if int4 - found:
        raise RuntimeError(f"int4 rules name linears the graph does not have: {sorted(int4 - found)}")
    q = QnnQuantizer(soc_model=QcomChipset.SM8650)
    q.set_default_quant_config(
        QuantDtype.use_16a8w, is_linear_per_channel=True, is_conv_per_channel=True, is_embedding_per_channel=True
    )
    if four_bit:
        q.set_submodule_qconfig_list(
            [(lambda node: node.name in four_bit, QConfig(QuantDtype.use_16a4w, is_linear_per_channel=True))]
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(gm, q)
        with torch.no_grad():
            for feed in spec.calibration:
                prepared(*[torch.from_numpy(feed[n]) for n in spec.input_names])
        with _lean_weight_folding():
            converted = convert_pt2e(prepared)
    _drop_unread_weights(converted)
    return converted


def _drop_unread_weights(gm) -> None:
    """convert_pt2e folds each weight into integer codes but leaves the float original registered on
    the graph module, unread; the QNN lowering re-exported it as a constant (the 9B's fp32 lm_head,
    2.3 GiB, through the lowering of the last part)."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if name not in read:
            owner, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner), leaf)


# weights quantized at once in PT2E's constant folding: a slice of this many elements at a time
QUANTIZE_SLICE_ELEMENTS = 1 << 24


@contextmanager
def _lean_weight_folding():
    """convert_pt2e folds each weight's quantize node into its integer codes, and evaluates every
    dequantize node only to throw the value away (dequantize is never folded:
    ConstantFolder.is_impure). Both cost whole-weight temporaries: the dequantize an int64 and an
    fp32 copy (12 bytes per parameter, 7.4 GB for the 9B's 151552 x 4096 lm_head), quantize_per_channel
    two fp32 copies (2 x 2.3 GiB for the 9B token embedding, measured). Dequantize nodes are answered
    "unknown" up front and per-channel quantize runs a slice of channels at a time: the same graph
    and the same codes (the op is elementwise per channel) without the copies."""
    from torchao.quantization.pt2e import constant_fold

    folder = constant_fold.ConstantFolder
    original = folder._deduce_value
    dequantize = {
        torch.ops.quantized_decomposed.dequantize_per_channel.default,
        torch.ops.quantized_decomposed.dequantize_per_tensor.default,
        torch.ops.quantized_decomposed.dequantize_per_tensor.tensor,
    }
    quantize = torch.ops.quantized_decomposed.quantize_per_channel.default

    def deduce(self, node):
        if node.op == "call_function" and node.target in dequantize:
            return self.unknown_value
        if node.op == "call_function" and node.target is quantize and self.lifted_constant_names is None:
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            return quantize_per_channel_in_slices(*args, **kwargs)
        return original(self, node)

    folder._deduce_value = deduce
    try:
        yield
    finally:
        folder._deduce_value = original


def quantize_per_channel_in_slices(weight, scales, zero_points, axis, quant_min, quant_max, dtype):
    """``quantized_decomposed.quantize_per_channel`` a slice of channels at a time (axis 0 of a
    contiguous weight; anything else runs the op whole)."""
    op = torch.ops.quantized_decomposed.quantize_per_channel.default
    if axis != 0 or not weight.is_contiguous() or weight.numel() <= QUANTIZE_SLICE_ELEMENTS:
        return op(weight, scales, zero_points, axis, quant_min, quant_max, dtype)
    rows = max(1, QUANTIZE_SLICE_ELEMENTS // (weight.numel() // weight.shape[0]))
    out = torch.empty(weight.shape, dtype=dtype)
    for w, s, z, o in zip(weight.split(rows), scales.split(rows), zero_points.split(rows), out.split(rows)):
        o.copy_(op(w, s, z, 0, quant_min, quant_max, dtype))
    return out


def _free_float_weights(float_modules, quantized) -> None:
    """Free the tensors of ``float_modules`` that no graph of ``quantized`` reads. Once PT2E has
    calibrated and converted a component, lowering reads only the converted graphs, but the float
    module stays referenced by its caller until the lowering returns (9B decoder part with the
    lm_head: 3.1 GiB of fp32 held through the QNN lowering)."""
    read = set()
    for gm in quantized:
        for n in gm.graph.nodes:
            if n.op == "get_attr" and isinstance(t := fetch_attr(gm, n.target), torch.Tensor):
                read.add(t.untyped_storage().data_ptr())
    for module in float_modules:
        for t in [*module.parameters(), *module.buffers()]:
            if t.untyped_storage().data_ptr() not in read:
                t.data = torch.empty(0, dtype=t.dtype)


class QnnTarget(Target):
    runtime_name = (
        "ExecuTorch C++ runtime (Python bindings) + QNN HTP delegate (x86_64 HTP emulator), compiled for SM8650 / v75"
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._state: dict = {}  # calibration state carried across components during export
        self._ref_states: dict[str, dict] = {}  # the same, per bundle, while verify rebuilds references
        self._qnn = None  # the recipe's qnn section (configure)
        self._twin = None  # the emulator twin of a weight-shared model.pte, for the bundle being exported
        self._twin_for = None
        self._plans: dict = {}  # check_plans: what export lowers each component to
        self._contexts: dict = {}  # check_plans: the HTP contexts of each component, or of each decoder part
        self._in_parts = False  # check_plans: the recipe lowers the decoder in parts

    def check_plans(self, plans: dict, recipe_file: str, parts: list | None = None) -> None:
        from ..shared.htp_plans import check_npu_plans
        from ..shared.memory_fit import refuse_if_over_memory

        preload_qnn_libraries()  # a missing toolchain is reported before any tensor is read
        check_npu_plans(plans, recipe_file)
        refuse_if_over_memory(
            "qnn",
            plans,
            held=HELD_BYTES_PER_PARAM,
            per_component=LOWER_BYTES_PER_PARAM,
            parts=parts,
            how="quantizes (PT2E) and lowers each component (or decoder part) whole",
            fix="or lower the decoder in parts: recipe lowering.decoder_layers_per_program",
        )
        opts = self._qnn
        self._plans = dict(plans)
        self._in_parts = bool(parts) and "text_decoder" in plans
        if self._in_parts:  # keyed (name, layers): what export meets
            whole = self._plans.pop("text_decoder")
            for layers in parts:
                self._plans[("text_decoder", layers)] = whole.decoder_part(layers, parts[-1][1])
        self._contexts = {
            key: plan_contexts(
                plan,
                len(graph_names(plan.component)),
                opts.max_context_bytes,
                opts.weight_sharing and len(graph_names(plan.component)) > 1,
                recipe_file,
            )
            for key, plan in self._plans.items()
        }

    def configure(self, recipe, recipe_file: str, *, tokenizer, pre, base=None) -> None:
        from ...calibration import load_calibration

        self.release()  # an earlier export's emulator twin, should it have failed before its own release
        self._qnn = recipe.qnn
        self.calibration_set = load_calibration(
            recipe.calibration, Path(base or Path(recipe_file).parent), recipe_file, tokenizer, pre
        )
        self._state = {"calibration": self.calibration_set}  # until release(): decoder parts come after lower()
        self._ref_states = {}

    def export(self, name: str, module: torch.nn.Module, prefill_chunk: int) -> dict:
        """The component's static graphs, quantized and lowered at once: only their lowered form
        (contexts of int8/int4 codes) waits for the other components, not the fp32 module (at 9B
        widths the held fp32 modules of the encoders and the token embedding were 3.4 GB)."""
        key = name
        if name == "text_decoder" and self._in_parts:
            key = (name, (module.layer_ids[0], module.layer_ids[-1] + 1))
        graphs = static_graphs(name, module, prefill_chunk, self._state)
        return self._lower_component(name, graphs, self._plans[key], self._contexts[key], self.progress)

    def _lower_component(self, name: str, graphs: dict, plan, ctx, progress) -> dict:
        modules, precision, graph_info = {}, "fp16", {}
        for graph, spec in graphs.items():
            if plan.quantized:
                int4 = any(w.scheme == "int4" for w in plan.weights.values())
                progress(
                    f"{graph}: PT2E QnnQuantizer, "
                    f"{'16a4w on int4-rule linears (per output channel), 16a8w elsewhere' if int4 else '16a8w'}"
                )
                modules[graph] = quantize_graph(spec, plan)
                precision = "16a4w/16a8w" if int4 else "16a8w"
            else:
                modules[graph] = spec.module
            graph_info[graph] = {
                "component": name,
                "precision": precision,
                "tokens": spec.tokens,
                "inputs": [{"name": n, "shape": list(a.shape)} for n, a in zip(spec.input_names, spec.args)],
                "outputs": spec.output_names,
            }
            if precision == "16a4w/16a8w":  # a rule's group_size reads as if it applied (capabilities.per_channel_int4)
                graph_info[graph]["int4_granularity"] = (
                    "symmetric, per output channel (QNN); a rule's group_size does not apply"
                )
        if plan.quantized:
            _free_float_weights([spec.module for spec in graphs.values()], modules.values())
        args = {g: spec.args for g, spec in graphs.items()}
        progress(
            f"{name}: QNN HTP lowering of {len(modules)} graph(s) into {len(ctx.groups)} context(s) for {SOC_NAME} "
            f"(htp_arch {HTP_ARCH}){', weights shared' if ctx.weight_sharing else ''}"
        )
        lowered = {
            "graph_info": graph_info,
            "contexts": ctx,
            "shipped": _lower_group(modules, args, precision == "fp16", ctx, plan),
        }
        if ctx.weight_sharing and self.verifying:  # the x86 emulator cannot load shared-weight contexts
            # lowered when the shipped file is written and its programs freed (_write_program): the two
            # lowered forms of a 9B decoder part (contexts and constants) are never held at once
            def emulated(modules=modules, args=args, fp16=precision == "fp16", twin=replace(ctx, weight_sharing=False)):
                progress(f"{name}: the same graphs without weight sharing, for the emulator")
                return _lower_group(modules, args, fp16, twin, plan)

            lowered["emulated"] = emulated
        del modules
        release_export_caches()
        return lowered

    def lower(self, programs: dict, model_meta: dict, out_dir: Path, progress, plans: dict) -> dict:
        """``programs``: each component as ``export`` lowered it; emitted here into one ``model.pte``
        (a decoder in parts is not among them: ``lower_part`` writes each part's own file)."""
        note = preload_qnn_libraries()
        opts = self._qnn
        contexts = {name: low["contexts"] for name, low in programs.items()}
        graph_info, soc = self._write_program(
            list(programs.values()), metadata_methods(model_meta, dynamic_shape=False), out_dir, PTE, progress
        )
        methods = {}
        for name in programs:
            graphs = {g: graph_info[g] for g in graph_names(name)}
            methods[name] = {"file": PTE, "graphs": graphs, "contexts": contexts[name].to_json()}
            if name == "text_decoder":
                methods[name].update(self._decoder_entry())
        shared = opts.weight_sharing and any(n in plans for n in ("token_embedding", "text_decoder"))
        qnn = {
            "soc": SOC_NAME,
            "soc_model": SOC_MODEL,
            "htp_arch": HTP_ARCH,
            "libraries": note,
            "pte_soc_type": f"soc_type={SOC_NAME}" if soc else None,
            "max_context_bytes": opts.max_context_bytes,
            "weight_sharing": opts.weight_sharing,
            "emulator_note": "every check of this bundle ran on the x86 HTP emulator"
            + (
                " on twins of its .pte files compiled from the same quantized graphs without weight sharing (the "
                "emulator cannot load shared-weight contexts); the shipped files themselves are checked for delegation, "
                "SoC and methods"
                if shared
                else ""
            )
            + "; device numerics, speed and loading by the phone's QNN runtime "
            "libraries are not proven here",
        }
        cal = self.calibration_set.to_json() if self.calibration_set else None
        return {"files": [PTE], "methods": methods, "manifest": {"qnn": qnn, "calibration": cal}}

    def lower_part(self, name: str, program: dict, layers: tuple[int, int], out_dir: Path, progress, plan) -> dict:
        """One part of the decoder (``recipe.lowering``), as ``export`` lowered it, emitted into its
        own ``.pte`` with the methods text_decoder_prefill / text_decoder_decode over its layers' caches."""
        from ...bundle import part_file

        file = part_file(name, layers, "pte")
        ctx = program["contexts"]
        graph_info, _ = self._write_program([program], {}, out_dir, file, progress)
        return {
            "file": file,
            "method": name,
            "layers": list(layers),
            "graphs": graph_info,
            "contexts": ctx.to_json(),
            "component": self._decoder_entry(),
        }

    def _decoder_entry(self) -> dict:
        return {
            "rope": self._state["rope"],
            "state": {
                "kv_cache": {
                    "held_by": "host",
                    "note": "graphs return the new keys/values; the host writes them at cache_position",
                }
            },
        }

    def _write_program(self, lowered: list[dict], meta: dict, out_dir: Path, file: str, progress) -> tuple[dict, bool]:
        """Emit the graphs of ``lowered`` (components or one decoder part) as the methods of
        ``out_dir/file``, and of its emulator twin when contexts share weights; returns each graph's
        manifest entry and whether the file is compiled for SM8650."""
        from executorch.exir.lowered_backend_module import get_lowered_submodules

        graph_info = {g: info for low in lowered for g, info in low.pop("graph_info").items()}
        soc = False
        for variant in ("shipped", "emulated"):
            if variant == "emulated" and not any("emulated" in low for low in lowered):
                break
            if variant == "emulated":  # lowered now that the shipped programs are freed
                for low in lowered:
                    if callable(low.get("emulated")):
                        low["emulated"] = low["emulated"]()
            programs = [low[variant] if low.get(variant) is not None else low["shipped"] for low in lowered]
            eps = {g: prog.exported_program(g) for prog in programs for g in prog.methods}
            del programs
            progress(f"emitting {file}" + (" (emulator twin)" if variant == "emulated" else ""))
            buf = _emit(eps, meta)
            if variant == "shipped":
                (out_dir / file).write_bytes(buf)
                soc = f"soc_type={SOC_NAME}".encode() in buf
                for g, ep in eps.items():
                    gm = ep.graph_module
                    outside = sorted(
                        {
                            str(n.target)
                            for n in gm.graph.nodes
                            if n.op == "call_function"
                            and "executorch_call_delegate" not in str(n.target)
                            and "getitem" not in str(n.target)
                        }
                    )
                    sizes = [len(low.processed_bytes) for _, low, _ in get_lowered_submodules(gm)]
                    graph_info[g].update(
                        {"ops_outside_delegate": outside, "contexts": len(sizes), "context_bytes": sizes}
                    )
            else:
                if self._twin is None:
                    self._twin = tempfile.TemporaryDirectory(prefix="autoglm-qnn-twin-")
                    self._twin_for = str(out_dir.resolve())
                (Path(self._twin.name) / file).write_bytes(buf)
            del buf, eps
            if variant == "shipped" and any(low.get("emulated") is not None for low in lowered):
                # written: a program with a twin is not read again, and its contexts and constants need
                # not sit beside the twin's while that is lowered and emitted
                for low in lowered:
                    if low.get("emulated") is not None:
                        low["shipped"] = None
                release_export_caches()
        for low in lowered:  # the lowered programs (and their contexts) are in the file now
            low.clear()
        # emitting ran fake-tensor passes whose dispatch cache keys hold the lowered modules, and
        # through them every quantized weight (9B: both token embedding graphs' int8 tables, 1.16 GiB)
        release_export_caches()
        return graph_info, soc

    def release(self) -> None:
        if self._twin is not None:
            self._twin.cleanup()
        self._twin = self._twin_for = None
        self._state = {"calibration": self.calibration_set}

    def open_runtime(self, bundle: Path, manifest: dict) -> "QnnPteRuntime":
        shared = any(
            p.get("contexts", {}).get("weight_sharing")
            for c in manifest["components"].values()
            for p in c.get("programs") or [c]
        )
        if not shared:
            return QnnPteRuntime(bundle, manifest)
        if self._twin is not None and self._twin_for == str(Path(bundle).resolve()):
            return QnnPteRuntime(bundle, manifest, emulated=Path(self._twin.name))
        # an export with verification off wrote no twin and no report: say which this bundle had
        checked = (
            "it was verified at export on an unshared twin (report.json)"
            if (Path(bundle) / REPORT).is_file()
            else "it was exported without verification (no report.json)"
        )
        raise BackendUnavailable(
            "this bundle's QNN contexts share weights between prefill and decode, which the x86 HTP "
            f"emulator cannot load ('Shared weights buffer isn't supported on this platform'); {checked}",
            fix="re-export with `qnn: {weight_sharing: false}` in the recipe to verify the shipped "
            "file itself here, or run it on an SM8650 device",
        )

    def reference_component(self, name: str, plan, bundle: Path, manifest: dict, load=None):
        """The PT2E-converted graphs of a quantized component (calibrated exactly as at export);
        None for fp16 components (PyTorch in fp16). Components are visited in registry order, so
        the calibration state the decoder needs is rebuilt on the way; a decoder in parts is
        rebuilt part by part (``load(layers)``), each calibrated on the one before. The converted
        graphs are held and run lean (``simulation.py``): the same values up to float rounding, a
        fraction of the memory."""
        if load is None:  # pragma: no cover - verify always passes a loader
            return None
        chunk = manifest["shapes"]["prefill_chunk"]
        state = self._ref_states.setdefault(str(Path(bundle).resolve()), {"calibration": self.calibration_set})
        pool = state.setdefault("constants", {})  # equal codes held once across graphs and buckets
        programs = manifest["components"][name].get("programs") if name == "text_decoder" else None
        if not programs:
            graphs = static_graphs(name, load(), chunk, state)
            if not plan.quantized:
                return None
            sims = {g: lean_simulation(quantize_graph(spec, plan), pool) for g, spec in graphs.items()}
            inputs = {
                g: [(n, list(a.shape)) for n, a in zip(spec.input_names, spec.args)] for g, spec in graphs.items()
            }
            del graphs
            release_export_caches()  # PT2E's caches hold the prepared graph, the fp32 weights with it
            return ComponentAdapter(_SimRuntime(manifest, sims, inputs), name)
        sims, inputs = {}, {}
        last = programs[-1]["layers"][1]
        for p in programs:
            layers = tuple(p["layers"])
            graphs = static_graphs(name, load(layers), chunk, state)
            for g, spec in graphs.items():
                sims[graph_key(p["file"], g)] = (
                    lean_simulation(quantize_graph(spec, plan.decoder_part(layers, last)), pool)
                    if plan.quantized
                    else spec.module
                )
                inputs[graph_key(p["file"], g)] = [(n, list(a.shape)) for n, a in zip(spec.input_names, spec.args)]
            graphs = spec = None  # the part's fp32 module, once converted
            release_export_caches()
        if not plan.quantized:
            return None
        return ComponentAdapter(_SimRuntime(manifest, sims, inputs), name)

    def refuse_against(self, against: str, bundle: Path) -> None:
        """Called before verification starts: this target has no independent-runtime gate."""
        raise ExportError(
            "the qnn target has no ONNX Runtime gate: its reference is the PT2E simulation, which "
            "does not export to ONNX as is",
            field="--against",
            file=bundle,
            fix="export the same checkpoint with --target onnx-qnn, whose bundle runs in ONNX Runtime's QNN EP",
        )

    def contract_checks(self, runtime: "QnnPteRuntime", manifest: dict) -> list[dict]:
        checks = []
        soc = {}  # file -> compiled for SM8650
        for key, (file, _, g) in graph_entries(manifest).items():
            if file not in soc:
                soc[file] = f"soc_type={SOC_NAME}".encode() in (runtime.bundle / file).read_bytes()
            fits = max(g["context_bytes"], default=0) <= HTP_CONTEXT_LIMIT
            ok = not g["ops_outside_delegate"] and g["contexts"] >= 1 and fits
            detail = (
                f"{g['contexts']} QNN context(s), no op outside"
                if not g["ops_outside_delegate"]
                else f"outside the delegate: {g['ops_outside_delegate']}"
            )
            detail += "" if fits else f"; a context over {HTP_CONTEXT_LIMIT} bytes"
            checks.append(
                {
                    "name": f"qnn/{key}/all_ops_delegated",
                    "kind": "contract",
                    "gated": True,
                    "passed": ok and soc[file],
                    "detail": detail + ("; SM8650" if soc[file] else "; NOT compiled for SM8650"),
                }
            )
        graphs = {graph for file, graph, _ in graph_entries(manifest).values() if file == PTE}
        checks.append(contract_check(runtime.pte, manifest, methods=graphs, dynamic_shape=False))
        return checks

    def versions(self) -> dict:
        from importlib.metadata import version

        return {p: version(p) for p in ("executorch", "torch", "torchao", "onnxruntime-qnn")}


class _SimRuntime(StaticGraphRuntime):
    """The PT2E-converted graphs in PyTorch: the simulation of the HTP's quantization."""

    def __init__(self, manifest: dict, sims: dict, graph_inputs: dict) -> None:
        self.sims = sims
        super().__init__(manifest, graph_inputs)

    @torch.no_grad()
    def _run(self, graph: str, feeds: dict) -> list[np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n, _ in self.graph_inputs[graph]]
        out = self.sims[graph](*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [o.numpy() for o in out]


class QnnPteRuntime(StaticGraphRuntime):
    """The bundle's ``.pte`` files on the HTP emulator through ExecuTorch's C++ runtime, in a process
    of its own: the emulator's libraries stay out of the exporting process (they cannot share one
    with ONNX Runtime's QNN EP), and a crash inside them becomes an error here instead of killing
    the export. This process still reads ``model.pte``'s metadata methods (no QNN code runs for those).

    ``emulated``: a directory of twins of the bundle's files, which the emulator runs instead of
    the shipped ones when the bundle's contexts share weights."""

    def __init__(self, bundle: Path, manifest: dict, emulated: Path | None = None) -> None:
        self.bundle = Path(bundle)
        shapes = manifest["shapes"]
        # model.pte alone: the decoder parts' programs are only ever loaded by the emulator process
        self.pte = ExecuTorchRuntime(self.bundle / PTE, shapes["max_context"], shapes["prefill_chunk"])
        self.entries = graph_entries(manifest)
        graph_inputs = {key: [(i["name"], i["shape"]) for i in g["inputs"]] for key, (_, _, g) in self.entries.items()}
        super().__init__(manifest, graph_inputs)
        files = sorted({file for file, _, _ in self.entries.values()})
        where = Path(emulated) if emulated else self.bundle
        self._worker = _EmulatorProcess({f: where / f for f in files})

    def _run(self, graph: str, feeds: dict) -> list[np.ndarray]:
        file, method, _ = self.entries[graph]
        return self._worker.run(file, method, [np.ascontiguousarray(feeds[n]) for n, _ in self.graph_inputs[graph]])

    def close(self) -> None:
        self._worker.close()

    def __del__(self) -> None:
        if getattr(self, "_worker", None) is not None:
            self._worker.close()


class _EmulatorProcess:
    """A spawned child that loads the bundle's .pte files on the HTP emulator (each when first
    used) and runs their methods on request."""

    def __init__(self, files: dict[str, Path]) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited QNN or ORT state
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_emulator_main, args=(child, {f: str(p) for f, p in files.items()}), daemon=True
        )
        self._proc.start()
        child.close()
        self._expect(self._conn_recv(), "loading")

    def _conn_recv(self):
        try:
            return self._conn.recv()
        except (EOFError, ConnectionError):
            self._proc.join(5)
            raise ExportError(
                f"the HTP emulator process died (exit code {self._proc.exitcode}) running the bundle's program",
                fix="run `autoglm-export verify` on the bundle to see the emulator's own log",
            ) from None

    @staticmethod
    def _expect(msg, what: str):
        kind, payload = msg
        if kind == "error":
            raise BackendUnavailable(
                f"the HTP emulator failed {what}: {payload}",
                fix="see qnn.weight_sharing in the recipe docs; the emulator cannot load shared-weight contexts",
            )
        return payload

    def run(self, file: str, method: str, args: list[np.ndarray]) -> list[np.ndarray]:
        self._conn.send((file, method, args))
        return self._expect(self._conn_recv(), f"running {method} of {file}")

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()


def _emulator_main(conn, files: dict[str, str]) -> None:
    from ...progress import quiet_third_party_logs

    quiet_third_party_logs()  # a fresh interpreter: the parent's logging setup does not carry over
    # results and errors travel through the pipe, so this child's stdout and stderr are nobody's:
    # QNN's LIBNATIVE lines, per-call logs and the teardown of every context at exit go nowhere
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    try:
        preload_qnn_libraries()
        programs = {PTE: load_program(Path(files[PTE]))} if PTE in files else {}
        methods: dict = {}
        conn.send(("ok", None))
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    while (msg := conn.recv()) is not None:
        file, name, args = msg
        try:
            if (file, name) not in methods:
                if file not in programs:
                    programs[file] = load_program(Path(files[file]))
                methods[(file, name)] = programs[file].load_method(name)
            out = methods[(file, name)].execute([torch.from_numpy(a) for a in args])
            conn.send(("ok", [o.numpy() for o in out]))
        except Exception as e:  # noqa: BLE001
            conn.send(("error", f"{type(e).__name__}: {e}"))
