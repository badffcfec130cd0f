"""--target onnx-qnn: ONNX Runtime QNN context binaries for Snapdragon 8 Gen 3 (SM8650, HTP v75).

Every component becomes static-shape ONNX graphs (the token embedding and the text decoder as a
prefill graph of ``prefill_chunk`` tokens and a decode graph of one token; the decoder in the
``TextDecoderStatic`` form: host-side cos/sin, mask and KV cache). Components with integer
recipe rules are quantized with ONNX Runtime's QNN helpers into QDQ models: 16-bit activations,
8-bit weights, 4-bit on the MatMul weights an ``int4`` rule names (never on norms or gathers).
Components whose rules say ``fp16`` stay float graphs that the HTP runs in fp16. Each graph is
then compiled offline by the ``onnxruntime-qnn`` plugin EP (QNN 2.51) into an EPContext model
with its QNN context binary for soc_model 57 / htp_arch 75, with CPU fallback disabled, so a
node the HTP cannot take fails the export instead of running on the CPU.

The bundle holds both the portable QDQ/float models and the compiled EPContext models.
Verification runs the EPContext models on the x86 HTP emulator (``libQnnHtp.so``) and compares
them with the same QDQ models on ORT's CPU provider (the "same quantization" reference) and
with the fp32 PyTorch reference.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ...errors import BackendUnavailable, ExportError
from ..contract import Target
from ..shared.htp_plans import check_npu_plans
from ..shared.onnx_weights import weight_digest
from ..shared.static_graphs import graph_names as _graphs
from ..shared.static_graphs import ComponentAdapter, StaticGraphRuntime, static_graphs
from .rms_norm_fusion import fuse_rms_norm

SOC_MODEL, HTP_ARCH, SOC_NAME = "57", "75", "SM8650"
OPSET = 21  # 16-bit QDQ needs opset 21; exported at 20 and raised (no op used here changed)
_registered = False


def _ort_qnn():
    global _registered
    try:
        import onnxruntime as ort
        import onnxruntime_qnn
    except ImportError as e:  # pragma: no cover - both are pinned dependencies
        raise BackendUnavailable(
            f"the onnx-qnn target needs onnxruntime and onnxruntime-qnn ({e.name} is missing)",
            fix="pip install onnxruntime==1.31.1 onnxruntime-qnn==2.7.0 (make setup does)",
        ) from None
    if not _registered:
        ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
        _registered = True
    return ort, onnxruntime_qnn


def qnn_session_options(*, fp16: bool, context_file: Path | None = None, record: bool = False):
    """Session options that put every node on the QNN HTP backend (SM8650 / v75) or fail."""
    ort, qnn = _ort_qnn()
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    if not devices:
        raise BackendUnavailable("onnxruntime-qnn registered no QNN device", fix="reinstall onnxruntime-qnn==2.7.0")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    opts = {
        "backend_path": qnn.get_qnn_htp_path(),
        "soc_model": SOC_MODEL,
        "htp_arch": HTP_ARCH,
        "enable_htp_fp16_precision": "1" if fp16 else "0",
    }
    so.add_provider_for_devices(devices, opts)
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if record:
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if context_file is not None:
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(context_file))
        so.add_session_config_entry("ep.context_embed_mode", "0")
    return so


class OnnxQnnTarget(Target):
    runtime_name = "onnxruntime-qnn (QNN HTP emulator on x86_64, compiled for SM8650 / v75)"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._calibration: dict[str, object] = {}

    def configure(self, recipe, recipe_file: str, *, tokenizer, pre, base=None) -> None:
        from ...calibration import load_calibration

        self.calibration_set = load_calibration(
            recipe.calibration, Path(base or Path(recipe_file).parent), recipe_file, tokenizer, pre
        )
        self._calibration = {"calibration": self.calibration_set}

    def check_plans(self, plans: dict, recipe_file: str, parts: list | None = None) -> None:
        _ort_qnn()  # a missing runtime is reported before any tensor is read
        check_npu_plans(plans, recipe_file)

    # ---------------------------------------------------------------- export (one component)

    def export(self, name: str, module: torch.nn.Module, prefill_chunk: int):
        graphs, calib = {}, {}
        for graph, spec in static_graphs(name, module, prefill_chunk, self._calibration).items():
            graphs[graph] = self._onnx(spec.module, spec.args, spec.input_names, spec.output_names)
            calib[graph] = spec.calibration
        params = {n: p.detach().float().numpy() for n, p in module.named_parameters()}
        return {"graphs": graphs, "calibration": calib, "params": params}

    @staticmethod
    def _onnx(module, args, names, outs):
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.onnx.export(
                module, args, dynamo=True, input_names=names, output_names=outs, optimize=True, verbose=False
            ).model_proto
        fuse_rms_norm(model)
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = OPSET
        model.ir_version = min(model.ir_version, 10)  # ORT 1.31 reads IR <= 10 for these opsets
        for node in model.graph.node:  # exporter debug metadata (this machine's paths)
            del node.metadata_props[:]
            node.doc_string = ""
        return model  # no onnx.checker: SimplifiedLayerNormalization is an ONNX Runtime op

    # ---------------------------------------------------------------- lower (quantize + compile)

    def lower(self, programs: dict, model_meta: dict, out_dir: Path, progress, plans: dict) -> dict:
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
        from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

        ort, qnn = _ort_qnn()
        files, methods = [], {}
        work = Path(tempfile.mkdtemp(prefix="onnx-qnn-"))
        try:
            for name, prog in programs.items():
                plan = plans[name]
                by_digest = {weight_digest(v.T): n for n, v in prog["params"].items() if v.ndim == 2}
                graphs = {}
                for graph in _graphs(name):
                    model = prog["graphs"][graph]
                    fp32 = work / f"{graph}.onnx"
                    onnx.save_model(model, str(fp32))
                    int4 = {}
                    if plan.quantized:
                        inits = {i.name: i for i in model.graph.initializer}
                        for node in model.graph.node:
                            if node.op_type == "MatMul" and node.input[1] in inits:
                                param = by_digest.get(weight_digest(onnx.numpy_helper.to_array(inits[node.input[1]])))
                                w = plan.weights.get(param) if param else None
                                if w is not None and w.scheme == "int4":
                                    int4[node.input[1]] = param
                        planned = {n for n, w in plan.weights.items() if w.scheme == "int4"}
                        if planned - set(int4.values()):
                            raise RuntimeError(
                                f"{graph}: int4 weights without a MatMul: {sorted(planned - set(int4.values()))}"
                            )
                        pre = work / f"{graph}.pre.onnx"
                        if not qnn_preprocess_model(str(fp32), str(pre)):
                            shutil.copyfile(fp32, pre)
                        feeds = iter(prog["calibration"][graph])

                        class Reader(CalibrationDataReader):
                            def get_next(self):
                                return next(feeds, None)

                        overrides = {w: [{"quant_type": QuantType.QInt4, "symmetric": True, "axis": 1}] for w in int4}
                        cfg = get_qnn_qdq_config(
                            str(pre),
                            Reader(),
                            activation_type=QuantType.QUInt16,
                            weight_type=QuantType.QUInt8,
                            init_overrides=overrides or None,
                        )
                        portable = out_dir / f"{graph}.qdq.onnx"
                        progress(
                            f"{graph}: QDQ 16-bit activations, 8-bit weights"
                            + (f", 4-bit on {len(int4)} MatMul weight(s)" if int4 else "")
                        )
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            logging.getLogger().setLevel(logging.ERROR)
                            quantize(str(pre), str(portable), cfg)
                        precision = "16a4w/16a8w" if int4 else "16a8w"
                        _strip(portable)
                    else:
                        portable = out_dir / f"{graph}.onnx"
                        shutil.copyfile(fp32, portable)  # already stripped by _onnx
                        precision = "fp16"
                    progress(f"{graph}: compiling the QNN context binary for {SOC_NAME} (htp_arch {HTP_ARCH})")
                    ctx = out_dir / f"{graph}_ctx.onnx"
                    so = qnn_session_options(fp16=precision == "fp16", context_file=ctx, record=True)
                    try:
                        # from bytes, not a path: ORT names the QNN graph after a hash of the model's path
                        # when it has one, which would make the binary differ from export to export
                        session = ort.InferenceSession(portable.read_bytes(), so)
                    except Exception as e:
                        raise ExportError(
                            f"QNN could not compile {graph} ({str(e).splitlines()[0][:160]})",
                            field=f"component {name}",
                            fix="a node the HTP rejects: see the QNN op support list; "
                            "change the recipe rule for this component",
                        ) from None
                    info = session.get_provider_graph_assignment_info()
                    assigned = sum(len(s.get_nodes()) for s in info if s.ep_name == "QNNExecutionProvider")
                    if any(s.ep_name != "QNNExecutionProvider" for s in info):
                        raise RuntimeError(f"{graph}: nodes outside QNN although CPU fallback is disabled")
                    total = len(onnx.load_model(str(portable), load_external_data=False).graph.node)
                    del session
                    binaries = sorted(p.name for p in out_dir.glob(f"{graph}_ctx*.bin"))
                    if not ctx.is_file() or not binaries:
                        raise RuntimeError(f"{graph}: onnxruntime-qnn wrote no EPContext model / context binary")
                    _check_context_paths(ctx)
                    files += [portable.name, ctx.name, *binaries]
                    graphs[graph] = {
                        "model": portable.name,
                        "context": ctx.name,
                        "binaries": binaries,
                        "context_bytes": sum((out_dir / b).stat().st_size for b in binaries),
                        "precision": precision,
                        "onnx_nodes": total,
                        "session_nodes_on_qnn": assigned,
                        "int4_weights": sorted(int4.values()),
                        "int4_granularity": "symmetric, per output channel (QNN); a rule's group_size does not apply",
                        "tokens": _tokens(model, graph),
                    }
                methods[name] = {"file": graphs[_graphs(name)[0]]["context"], "graphs": graphs}
                if name == "text_decoder":
                    methods[name]["rope"] = self._calibration["rope"]
                    methods[name]["state"] = {
                        "kv_cache": {
                            "held_by": "host",
                            "note": "graphs return the new keys/values; the host writes them at cache_position",
                        }
                    }
        finally:
            shutil.rmtree(work, ignore_errors=True)
            self._calibration = {"calibration": self.calibration_set}
        cal = self.calibration_set.to_json() if self.calibration_set else None
        return {
            "files": files,
            "methods": methods,
            "manifest": {
                "calibration": cal,
                "qnn": {
                    "soc_model": int(SOC_MODEL),
                    "soc": SOC_NAME,
                    "htp_arch": int(HTP_ARCH),
                    "qnn_sdk": qnn.build_and_package_info.qnn_version,
                    "onnxruntime_qnn": qnn.__version__,
                    "library": "libQnnHtp.so from the onnxruntime-qnn wheel (x86_64 HTP emulator)",
                    "emulator_note": "every check of this bundle ran on the x86 HTP emulator; device numerics, "
                    "speed and loading by the phone's QNN runtime are not proven here",
                },
            },
        }

    # ---------------------------------------------------------------- verification hooks

    def open_runtime(self, bundle: Path, manifest: dict):
        return OnnxQnnRuntime(bundle, manifest, device="qnn")

    def reference_component(self, name: str, plan, bundle: Path, manifest: dict, load=None):
        """ "PyTorch with the same weights" is, for a QDQ component, the same QDQ model on ORT's CPU
        provider; fp16 components fall back to PyTorch in fp16 (None)."""
        if not plan.quantized:
            return None
        rt = OnnxQnnRuntime(bundle, manifest, device="cpu", components=[name])
        return ComponentAdapter(rt, name)

    def against_onnxruntime(self, **_) -> dict:
        """The bundle already runs in ONNX Runtime (QNN EP on the emulator) and its own checks compare
        it with the same QDQ models on the CPU EP, all nodes on QNN, SM8650 binaries and a reload."""
        note = "onnx-qnn: the bundle's own checks above are the ONNX Runtime gate (QNN EP vs CPU EP)"
        return {
            "passed": True,
            "failed": [],
            "against": "onnxruntime",
            "checks": [{"name": "onnxruntime/gate", "kind": "note", "gated": False, "passed": None, "note": note}],
        }

    def contract_checks(self, runtime: "OnnxQnnRuntime", manifest: dict) -> list[dict]:
        """Gated: every node of every graph on QNN (no CPU fallback), the binaries compiled for
        SM8650 / v75, and the EPContext models (as loaded by the runtime) matching a fresh
        in-process compile of the same portable models."""
        checks = []
        bundle = runtime.bundle
        for comp in manifest["components"].values():
            for graph, g in comp["graphs"].items():
                session = _ort_qnn()[0].InferenceSession(
                    str(bundle / g["model"]), qnn_session_options(fp16=g["precision"] == "fp16", record=True)
                )
                # counted on the session's own (optimised) graph: every subgraph must belong to QNN
                info = session.get_provider_graph_assignment_info()
                on_qnn = sum(len(s.get_nodes()) for s in info if s.ep_name == "QNNExecutionProvider")
                elsewhere = {s.ep_name: len(s.get_nodes()) for s in info if s.ep_name != "QNNExecutionProvider"}
                blob = b"".join((bundle / b).read_bytes() for b in g["binaries"])
                soc = f"soc_type={SOC_NAME};arch={HTP_ARCH}".encode() in blob
                detail = f"{on_qnn} nodes on QNN, {sum(elsewhere.values())} elsewhere; binary " + (
                    "SM8650/v75" if soc else "NOT SM8650/v75"
                )
                checks.append(
                    {
                        "name": f"qnn/{graph}/all_nodes_on_htp",
                        "kind": "contract",
                        "gated": True,
                        "passed": on_qnn > 0 and not elsewhere and soc,
                        "detail": detail,
                        "nodes_on_qnn": on_qnn,
                        "nodes_elsewhere": elsewhere,
                        "soc_type_sm8650_arch75": soc,
                    }
                )
                probe = runtime.probe_feeds(graph)
                fresh = session.run(None, probe)
                loaded = runtime.sessions[graph].run(None, probe)
                same = all(np.array_equal(a, b) for a, b in zip(fresh, loaded))
                checks.append(
                    {
                        "name": f"qnn/{graph}/context_reload",
                        "kind": "contract",
                        "gated": True,
                        "passed": same,
                        "detail": "EPContext model == fresh compile, bit for bit"
                        if same
                        else "EPContext model differs from a fresh compile",
                    }
                )
        return checks

    def versions(self) -> dict:
        from importlib.metadata import version

        return {p: version(p) for p in ("onnx", "onnxruntime", "onnxruntime-qnn", "onnxscript", "torch")}


def _tokens(model, graph: str) -> int | None:
    if not graph.endswith(("_prefill", "_decode")):
        return None
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return int(dims[1].dim_value)


def _strip(path: Path) -> None:
    """Drop the quantizer's free-text metadata (paths, timestamps) for determinism."""
    import onnx

    m = onnx.load_model(str(path))
    for node in m.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del m.metadata_props[:]
    m.producer_version = ""
    onnx.save_model(m, str(path))


def _check_context_paths(ctx: Path) -> None:
    """EPContext nodes name their binary relative to the model; check none points elsewhere."""
    import onnx

    m = onnx.load_model(str(ctx))
    for node in m.graph.node:
        if node.op_type == "EPContext":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            cache = attrs.get("ep_cache_context", b"")
            cache = cache.decode() if isinstance(cache, bytes) else str(cache)
            if "/" in cache or ".." in cache:
                raise RuntimeError(f"{ctx.name}: context binary path {cache!r} is not beside the model")


class OnnxQnnRuntime(StaticGraphRuntime):
    """The bundle's graphs in ONNX Runtime: EPContext models on the QNN HTP (``device="qnn"``) or
    the portable QDQ/float models on the CPU provider (``device="cpu"``)."""

    def __init__(self, bundle: Path, manifest: dict, device: str = "qnn", components: list[str] | None = None) -> None:
        ort, _ = _ort_qnn()
        self.bundle = Path(bundle)
        self.sessions = {}
        graph_inputs = {}
        for name, comp in manifest["components"].items():
            if components is not None and name not in components:
                continue
            for graph, g in comp["graphs"].items():
                if device == "qnn":
                    s = ort.InferenceSession(
                        str(self.bundle / g["context"]), qnn_session_options(fp16=g["precision"] == "fp16")
                    )
                else:
                    so = ort.SessionOptions()
                    so.log_severity_level = 3
                    s = ort.InferenceSession(str(self.bundle / g["model"]), so, providers=["CPUExecutionProvider"])
                self.sessions[graph] = s
                graph_inputs[graph] = [(i.name, [int(d) for d in i.shape]) for i in s.get_inputs()]
        super().__init__(manifest, graph_inputs)

    def _run(self, graph: str, feeds: dict) -> list[np.ndarray]:
        return self.sessions[graph].run(None, feeds)
