"""--target qnn: ExecuTorch with the Qualcomm QNN HTP delegate, compiled for SM8650 (HTP v75).

Every component becomes the static graphs of ``static_graphs`` (encoders; token embedding and
text decoder as a prefill graph of ``prefill_chunk`` tokens and a decode graph of one token,
the decoder in the host-cache form), each a method of one ``model.pte``. Components with integer
recipe rules are quantized with ExecuTorch's ``QnnQuantizer`` (PT2E): 16-bit activations and
8-bit per-channel weights by default, 4-bit per-channel on the linears an ``int4`` rule names
(16a4w); ``fp16`` components are compiled for the HTP's fp16 path. Lowering uses the QNN
libraries of ``qnn_libs`` (a QNN SDK, or the onnxruntime-qnn wheel through the compatibility
layer); the ``.pte`` runs on the x86 HTP emulator through ``executorch.runtime``.

"The same quantization in PyTorch" is the PT2E-converted graph (fake-quantized) of each method,
rebuilt deterministically from the checkpoint with the same calibration data.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendUnavailable, ExportError
from .executorch_common import ExecuTorchRuntime, contract_check, metadata_methods, quiet_native_stderr
from .static_graphs import ComponentAdapter, StaticGraphRuntime, graph_names, static_graphs

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
    from .qnn_libs import REAL_LIBRARY_ENV, qnn_environment

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


def _compiler_spec(fp16: bool):
    from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
    from executorch.backends.qualcomm.utils.utils import generate_htp_compiler_spec, generate_qnn_executorch_compiler_spec

    return generate_qnn_executorch_compiler_spec(soc_model=QcomChipset.SM8650, backend_options=generate_htp_compiler_spec(use_fp16=fp16))


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

    from ..models.glm4v.modules import TextDecoderStatic

    gm = torch.export.export(spec.module, spec.args, strict=True).module()
    prefix = "decoder." if isinstance(spec.module, TextDecoderStatic) else ""  # the wrapper's attribute name
    int4 = {n.rsplit(".", 1)[0] for n, w in plan.weights.items() if w.scheme == "int4"}
    four_bit = {node.name: path.removeprefix(prefix) for node, path in _linear_module_paths(gm).items()
                if path.removeprefix(prefix) in int4}  # fmt: skip
    found = set(four_bit.values())
    if int4 - found:
        raise RuntimeError(f"int4 rules name linears the graph does not have: {sorted(int4 - found)}")
    q = QnnQuantizer(soc_model=QcomChipset.SM8650)
    q.set_default_quant_config(QuantDtype.use_16a8w, is_linear_per_channel=True, is_conv_per_channel=True)
    if four_bit:
        q.set_submodule_qconfig_list([(lambda node: node.name in four_bit,
                                       QConfig(QuantDtype.use_16a4w, is_linear_per_channel=True))])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(gm, q)
        with torch.no_grad():
            for feed in spec.calibration:
                prepared(*[torch.from_numpy(feed[n]) for n in spec.input_names])
        return convert_pt2e(prepared)


class QnnBackend:
    name = "qnn"
    runtime_name = "executorch.runtime + QNN HTP delegate (x86_64 HTP emulator), compiled for SM8650 / v75"
    quantizes_in_torch = False

    def __init__(self) -> None:
        self._state: dict = {}  # calibration state carried across components during export
        self._ref_states: dict[str, dict] = {}  # the same, per bundle, while verify rebuilds references

    def torchao_config(self, scheme, group_size, module):  # pragma: no cover - never called
        raise AssertionError("the qnn target quantizes with PT2E after export")

    def check_plans(self, plans: dict, recipe_file: str) -> None:
        from .onnx_qnn import check_npu_plans

        preload_qnn_libraries()  # a missing toolchain is reported before any tensor is read
        check_npu_plans(plans, recipe_file)

    def export(self, name: str, module: torch.nn.Module, prefill_chunk: int):
        return static_graphs(name, module, prefill_chunk, self._state)

    def lower(self, programs: dict, model_meta: dict, out_dir: Path, progress, plans: dict) -> dict:
        from executorch.backends.qualcomm.utils.utils import to_edge_transform_and_lower_to_qnn
        from executorch.exir.lowered_backend_module import get_lowered_submodules

        note = preload_qnn_libraries()
        modules, inputs, specs, graph_info = {}, {}, {}, {}
        for name, graphs in programs.items():
            plan = plans[name]
            for graph, spec in graphs.items():
                if plan.quantized:
                    int4 = any(w.scheme == "int4" for w in plan.weights.values())
                    progress(f"{graph}: PT2E QnnQuantizer, {'16a4w on int4-rule linears, ' if int4 else ''}16a8w elsewhere")
                    modules[graph] = quantize_graph(spec, plan)
                    precision = "16a4w/16a8w" if int4 else "16a8w"
                else:
                    modules[graph] = spec.module
                    precision = "fp16"
                inputs[graph] = spec.args
                specs[graph] = _compiler_spec(fp16=precision == "fp16")
                graph_info[graph] = {"component": name, "precision": precision, "tokens": spec.tokens,
                                     "inputs": [{"name": n, "shape": list(a.shape)} for n, a in zip(spec.input_names, spec.args)],
                                     "outputs": spec.output_names}  # fmt: skip
        meta = metadata_methods(model_meta, dynamic_shape=False)
        progress(f"to_edge + QNN HTP lowering of {len(modules)} graph(s) for {SOC_NAME} (htp_arch {HTP_ARCH})")
        with quiet_native_stderr(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            edge = to_edge_transform_and_lower_to_qnn(modules, inputs, specs, constant_methods=meta)
        for graph in modules:
            gm = edge.exported_program(graph).graph_module
            outside = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"
                              and "executorch_call_delegate" not in str(n.target) and "getitem" not in str(n.target)})  # fmt: skip
            contexts = [len(lowered.processed_bytes) for _, lowered, _ in get_lowered_submodules(gm)]
            graph_info[graph].update({"ops_outside_delegate": outside, "contexts": len(contexts), "context_bytes": contexts})
        progress("emitting the ExecuTorch program")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            buf = edge.to_executorch().buffer
        buf = pin_context_signatures(buf)
        (out_dir / PTE).write_bytes(buf)
        methods = {}
        for name in programs:
            graphs = {g: graph_info[g] for g in graph_names(name)}
            methods[name] = {"file": PTE, "graphs": graphs}
            if name == "text_decoder":
                methods[name]["rope"] = self._state["rope"]
                methods[name]["state"] = {"kv_cache": {"held_by": "host", "note": "graphs return the new keys/values; "
                                                       "the host writes them at cache_position"}}  # fmt: skip
        self._state = {}
        qnn = {"soc": SOC_NAME, "soc_model": SOC_MODEL, "htp_arch": HTP_ARCH, "libraries": note,
               "pte_soc_type": f"soc_type={SOC_NAME}" if f"soc_type={SOC_NAME}".encode() in buf else None,
               "emulator_note": "every check of this bundle ran on the x86 HTP emulator; device numerics, speed and "
                                "loading by the phone's QNN runtime libraries are not proven here"}  # fmt: skip
        return {"files": [PTE], "methods": methods, "manifest": {"qnn": qnn}}

    def open_runtime(self, bundle: Path, manifest: dict) -> "QnnPteRuntime":
        return QnnPteRuntime(bundle, manifest)

    def reference_component(self, name: str, plan, bundle: Path, manifest: dict, load=None):
        """The PT2E-converted graphs of a quantized component (calibrated exactly as at export);
        None for fp16 components (PyTorch in fp16). Components are visited in registry order, so
        the calibration state the decoder needs is rebuilt on the way."""
        if load is None:  # pragma: no cover - verify always passes a loader
            return None
        shapes = manifest["shapes"]
        state = self._ref_states.setdefault(str(Path(bundle).resolve()), {})
        graphs = static_graphs(name, load(), shapes["prefill_chunk"], state)
        if not plan.quantized:
            return None
        sims = {g: quantize_graph(spec, plan) for g, spec in graphs.items()}
        inputs = {g: [(n, list(a.shape)) for n, a in zip(spec.input_names, spec.args)] for g, spec in graphs.items()}
        return ComponentAdapter(_SimRuntime(manifest, sims, inputs), name)

    def refuse_against(self, against: str, bundle: Path) -> None:
        """Called before verification starts: this target has no independent-runtime gate."""
        raise ExportError("the qnn target has no ONNX Runtime gate: its reference is the PT2E simulation, which "
                          "does not export to ONNX as is", field="--against", file=bundle,
                          fix="export the same checkpoint with --target onnx-qnn, whose bundle runs in ONNX Runtime's QNN EP")  # fmt: skip

    def contract_checks(self, runtime: "QnnPteRuntime", manifest: dict) -> list[dict]:
        checks = []
        blob = (runtime.bundle / PTE).read_bytes()
        soc = f"soc_type={SOC_NAME}".encode() in blob
        for comp in manifest["components"].values():
            for graph, g in comp["graphs"].items():
                ok = not g["ops_outside_delegate"] and g["contexts"] >= 1
                detail = (f"{g['contexts']} QNN context(s), no op outside" if ok else f"outside the delegate: {g['ops_outside_delegate']}")
                checks.append({"name": f"qnn/{graph}/all_ops_delegated", "kind": "contract", "gated": True,
                               "passed": ok and soc, "detail": detail + ("; SM8650" if soc else "; NOT compiled for SM8650")})  # fmt: skip
        graphs = {g for comp in manifest["components"].values() for g in comp["graphs"]}
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
        if "text_decoder_decode" not in sims:
            self.caches = []

    @torch.no_grad()
    def _run(self, graph: str, feeds: dict) -> list[np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n, _ in self.graph_inputs[graph]]
        out = self.sims[graph](*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [o.numpy() for o in out]


class QnnPteRuntime(StaticGraphRuntime):
    """The bundle's ``model.pte`` on the HTP emulator through ``executorch.runtime``."""

    def __init__(self, bundle: Path, manifest: dict) -> None:
        preload_qnn_libraries()
        self.bundle = Path(bundle)
        shapes = manifest["shapes"]
        self.pte = ExecuTorchRuntime(self.bundle / PTE, shapes["max_context"], shapes["prefill_chunk"])
        graph_inputs = {g: [(i["name"], i["shape"]) for i in spec["inputs"]]
                        for comp in manifest["components"].values() for g, spec in comp["graphs"].items()}  # fmt: skip
        super().__init__(manifest, graph_inputs)

    def _run(self, graph: str, feeds: dict) -> list[np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n, _ in self.graph_inputs[graph]]
        with quiet_native_stderr():
            out = self.pte.method(graph).execute(args)
        return [o.numpy() for o in out]


BACKEND = QnnBackend()
