"""--target onnx: one ONNX model per component for ONNX Runtime (CPU / mobile).

Exported with the maintained torch exporter (``torch.onnx.export(dynamo=True)``, onnxscript).
INT4 recipe rules become ``MatMulNBits`` through ONNX Runtime's own block-wise quantizer
(symmetric, the rule's group size); everything else stays fp32. The text decoder takes and
returns its KV cache explicitly (ONNX Runtime has no module state). Weights over 1 MiB go to
external data files beside each model; a weight an earlier model of the bundle already wrote (the
vision tower of every image bucket after the first) points at those bytes instead of a second copy,
and each method's ``data_files`` in the manifest lists the files its model reads.

Memory: each component is saved by the exporter straight to a scratch file with external data, so
the programs waiting for ``lower`` hold graphs, not weights; ``lower`` reads one component's weights back at a
time. Protobuf cannot serialise a message over 2 GiB, and the real token embedding alone is
2.5 GB in fp32: sizes are computed from shapes, never by serialising.

"PyTorch with the same weights" for this target is the fp32 module with every MatMulNBits
weight replaced by what the written model holds (``reference.py``).
"""

from __future__ import annotations

import logging
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ...bundle import decoder_part_paths, part_file
from ...errors import BundleError, ExportError, excerpt
from ...methods import is_vision_method
from ...models import family_of
from ..contract import Target
from ..shared.export_caches import release_export_caches
from ..shared.onnx_weights import weight_digest

EXTERNAL_DATA_THRESHOLD = 1 << 20


def _file(name: str) -> str:
    return f"{name}.onnx"


def _nbytes(tensor) -> int:
    """Bytes of an initializer's data, from its shape (``ByteSize`` fails past 2 GiB)."""
    import onnx

    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return math.prod(tensor.dims) * itemsize


class OnnxTarget(Target):
    runtime_name = "onnxruntime (CPUExecutionProvider)"

    def check_plans(self, plans: dict, recipe_file: str, parts: list | None = None) -> None:
        for plan in plans.values():
            if plan.dtype == "fp16" and plan.quantized:
                raise ExportError(
                    "the onnx target cannot mix int4 and fp16 in one component",
                    file=recipe_file,
                    field=f"quantization (component {plan.component})",
                    expected="fp32 with int4 rules, or all fp16",
                    got=plan.dtype,
                    fix="use fp32 for this component's float weights",
                )
            for w in plan.weights.values():
                if w.scheme == "int8":
                    raise ExportError(
                        "int8 rules are not supported by the onnx target",
                        file=recipe_file,
                        field=f"quantization[{w.rule}]",
                        expected="int4 (MatMulNBits) or fp32",
                        got=f"int8 for {w.weight}",
                        fix="use int4 with a group size, or fp32",
                    )
                if w.scheme == "int4" and w.weight.startswith("token_embedding."):
                    raise ExportError(
                        "int4 embeddings are not supported by the onnx target",
                        file=recipe_file,
                        field=f"quantization[{w.rule}]",
                        expected="fp32 for token_embedding",
                        got=w.weight,
                        fix="keep the token embedding fp32 for this target",
                    )

    def export(self, name: str, module: torch.nn.Module, prefill_chunk: int):
        from torch.export import Dim

        T = Dim("T", min=1, max=prefill_chunk)
        length = min(4, prefill_chunk)
        with torch.no_grad():
            if is_vision_method(name):
                args, names, outs, dyn = module.example_inputs(), ["pixel_values"], ["image_embeddings"], None
            elif name == "audio_encoder":
                args, names, outs, dyn = module.example_inputs(), ["input_features"], ["audio_embeddings"], None
            elif name == "token_embedding":
                args, names, outs, dyn = module.example_inputs(length), ["input_ids"], ["embeddings"], ({1: T},)
            elif name == "text_decoder":
                wrapper = family_of(module).decoder_form("explicit_cache", module).eval()
                caches = wrapper.empty_caches()
                args = (*module.example_inputs(length), caches)
                names = ["inputs_embeds", "position_ids", "cache_position", *wrapper.cache_names()]
                first = "logits" if module.has_head else "hidden_states"  # a part before the last
                outs = [first, *[n + "_out" for n in wrapper.cache_names()]]
                dyn = ({1: T}, {1: T}, {0: T}, [None] * len(caches))
                module = wrapper
            else:
                raise KeyError(name)
            # torch configures its loggers on import, so quieten them here, not at start-up
            logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*dynamic axes will not be renamed")
                program = torch.onnx.export(
                    module,
                    args,
                    dynamo=True,
                    input_names=names,
                    output_names=outs,
                    dynamic_shapes=dyn,
                    optimize=True,
                    verbose=False,
                )
            # straight to a scratch file: building program.model_proto would copy every weight
            # into one protobuf message (and fail past 2 GiB)
            import onnx

            scratch = tempfile.TemporaryDirectory(prefix="autoglm-onnx-")  # removed with the program
            program.save(Path(scratch.name) / "model.onnx", external_data=True)
            del program
            model = onnx.load(str(Path(scratch.name) / "model.onnx"), load_external_data=False)
            # digests of the plain 2-D float weights as the exporter lays them out for MatMul
            # (transposed), for mapping MatMul initializers back to recipe rules in lower();
            # torchao-quantized weights (the --against gate exports those as they are) are skipped
            prefix = "decoder." if name == "text_decoder" else ""
            digests = {
                weight_digest(p.detach().float().numpy().T): n.removeprefix(prefix)
                for n, p in module.named_parameters()
                if type(p) in (torch.Tensor, torch.nn.Parameter) and p.dim() == 2
            }
        release_export_caches()
        return {"model": model, "scratch": scratch, "digests": digests}

    def lower(self, programs: dict, model_meta: dict, out_dir: Path, progress, plans: dict) -> dict:
        files, methods = [], {}
        written_tensors: dict[tuple, dict] = {}  # content -> where an earlier model wrote it
        for name in list(programs):
            prog = programs.pop(name)  # one component's weights in memory at a time
            written, methods[name] = self._lower_one(
                name, prog, plans[name], out_dir / _file(name), progress, written_tensors
            )
            files += written
            del prog
        return {"files": files, "methods": methods}

    def lower_part(self, name: str, program, layers: tuple[int, int], out_dir: Path, progress, plan) -> dict:
        """One part of the decoder (``recipe.lowering``) as its own model, its KV cache inputs and
        outputs those of its own layers (``k_cache_{layer}``)."""
        from ...quantize import ComponentPlan

        a, b = layers
        path = out_dir / part_file(name, layers, "onnx")
        progress(f"{name} layers {a}..{b - 1} -> {path.name}")
        mine = set(program["digests"].values())
        part_plan = ComponentPlan(plan.component, plan.dtype, {n: w for n, w in plan.weights.items() if n in mine})
        files, info = self._lower_one(name, program, part_plan, path, progress)
        return {"files": files, "method": name, "layers": [a, b], **info}  # info names the file

    def _lower_one(
        self, name: str, prog: dict, plan, path: Path, progress, written_tensors: dict | None = None
    ) -> tuple[list[str], dict]:
        import onnx
        from onnx.external_data_helper import load_external_data_for_model
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        files: list[str] = []
        # one component's (or part's) weights, read back from its scratch file
        model, by_digest, scratch = prog["model"], prog["digests"], prog["scratch"]
        load_external_data_for_model(model, scratch.name)
        scratch.cleanup()
        inits = {i.name: i for i in model.graph.initializer}
        groups: dict[int, list[str]] = {}
        node_weights: dict[str, str] = {}
        constant_matmuls: list[str] = []
        for node in model.graph.node:
            if node.op_type != "MatMul" or node.input[1] not in inits:
                continue
            constant_matmuls.append(node.name)
            param = by_digest.get(weight_digest(onnx.numpy_helper.to_array(inits[node.input[1]])))
            w = plan.weights.get(param) if param else None
            if w is not None and w.scheme == "int4":
                groups.setdefault(matmul_nbits_block(w), []).append(node.name)
                node_weights[node.output[0]] = param  # the quantizer renames nodes, not outputs
        planned = {n for n, w in plan.weights.items() if w.scheme == "int4"}
        if planned - set(node_weights.values()):
            raise RuntimeError(
                f"{name}: int4 weights without a MatMul in the ONNX graph: {sorted(planned - set(node_weights.values()))}"
            )
        for group, nodes in sorted(groups.items()):
            progress(f"{name}: MatMulNBits int4 (block {group}) on {len(nodes)} MatMul node(s)")
            # the quantizer takes every MatMul with a constant weight unless told otherwise
            # (rotary matrices, other rules' weights): exclude all but this rule's nodes
            others = [n for n in constant_matmuls if n not in nodes]
            quantizer = MatMulNBitsQuantizer(
                model, bits=4, block_size=group, is_symmetric=True, nodes_to_exclude=others
            )
            quantizer.process()
            model = quantizer.model.model
        n_quant = sum(1 for node in model.graph.node if node.op_type == "MatMulNBits")
        if n_quant != len(node_weights):
            raise RuntimeError(f"{name}: {n_quant} MatMulNBits nodes, {len(node_weights)} planned")
        for node in model.graph.node:
            # exporter debug metadata: FX node text and stack traces with this machine's paths
            del node.metadata_props[:]
            node.doc_string = ""
        big = sum(_nbytes(t) for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
        shared, new = point_at_written_tensors(model, written_tensors or {})
        if shared:
            progress(f"{name}: {shared:,} bytes of weights shared with an earlier model of the bundle")
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=big,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=EXTERNAL_DATA_THRESHOLD,
        )
        files.append(path.name)
        if big and (path.parent / (path.name + ".data")).exists():
            (path.parent / (path.name + ".data")).chmod(0o644)  # onnx writes it 0600
            files.append(path.name + ".data")
        if written_tensors is not None:
            written_tensors.update(
                {new[t.name]: external_data_entry(t) for t in model.graph.initializer if t.name in new and external(t)}
            )
        ops: dict[str, int] = {}
        for node in model.graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        info = {
            "file": path.name,
            "data_files": external_data_files(model),
            "onnx_ops": dict(sorted(ops.items())),
            "quantized_outputs": dict(sorted(node_weights.items())),
        }
        del model
        return files, info

    def bundle_weights(self, name: str, root: torch.nn.Module, bundle: Path, manifest: dict, per_call: bool = True):
        """The weights the bundle really holds (MatMulNBits codes and scales), as an ``on_module`` hook
        that puts them into the fp32 reference while it loads (``reference.BundleWeights``)."""
        from .reference import BundleWeights

        return BundleWeights(root, read_nbits_weights(name, bundle, manifest), per_call)

    def open_runtime(self, bundle: Path, manifest: dict):
        return OnnxRuntime.from_bundle(bundle, manifest)

    def versions(self) -> dict:
        from importlib.metadata import version

        return {p: version(p) for p in ("onnx", "onnxruntime", "onnxscript", "torch")}


def external(tensor) -> bool:
    import onnx

    return tensor.data_location == onnx.TensorProto.EXTERNAL


def external_data_entry(tensor) -> dict:
    info = {e.key: e.value for e in tensor.external_data}
    return {"location": info["location"], "offset": int(info["offset"]), "length": int(info["length"])}


def external_data_files(model) -> list[str]:
    """The files a model's external tensors name (every tensor, node attributes included; a crafted
    model's entry without a location names "")."""
    from onnx.external_data_helper import _get_all_tensors

    locations = (
        {e.key: e.value for e in t.external_data}.get("location", "") for t in _get_all_tensors(model) if external(t)
    )
    return sorted(set(locations))


def read_nbits_weights(name: str, bundle: Path, manifest: dict) -> dict:
    """Parameter name -> ``reference.NBitsWeight`` of every quantized weight of a component: each model's
    graph, then only its MatMulNBits codes and scales (the rest of the external data, 3.6 GB of fp32
    ViT at 9B widths, is not read)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    from .reference import NBitsWeight

    weights = {}
    comp = manifest["components"][name]
    for prog in comp.get("programs") or [comp]:  # a decoder in parts: each part's own model
        wanted = prog["quantized_outputs"]
        if not wanted:  # nothing quantized: the module's fp32 weights are the model's
            continue
        model = load_checked_graph(bundle, prog)
        nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.output[0] in wanted]
        if len(nodes) != len(wanted):
            raise RuntimeError(
                f"{prog['file']}: {len(wanted)} quantized weights in the manifest, {len(nodes)} MatMulNBits in the model"
            )
        needed = {i for n in nodes for i in n.input[1:3]}
        inits = {}
        for t in model.graph.initializer:
            if t.name in needed:
                if external(t):
                    load_external_data_for_tensor(t, str(bundle))
                inits[t.name] = onnx.numpy_helper.to_array(t)
        for node in nodes:
            weights[wanted[node.output[0]]] = NBitsWeight.of(node, inits)
        del model, nodes, inits  # the graph's own copy of the codes
    return weights


def load_checked_graph(bundle: Path, entry: dict):
    """A bundle model's graph (no external data read), refused when it reads external data from a
    file its manifest entry does not list (``load_bundle`` has checked that those stay inside the
    bundle and match their hashes): ONNX Runtime would otherwise open whatever path a crafted model
    names."""
    import onnx

    path = Path(bundle) / entry["file"]
    model = onnx.load(str(path), load_external_data=False)
    extra = sorted(set(external_data_files(model)) - set(entry.get("data_files") or []))
    if extra:
        raise BundleError(
            "an ONNX model reads weights from a file its manifest entry does not list",
            file=path,
            field="external_data.location",
            expected=f"one of {entry.get('data_files') or []}",
            got=excerpt(repr(extra[0]), 120),
            fix="re-export the bundle with autoglm-export",
        )
    return model


def point_at_written_tensors(model, written: dict) -> tuple[int, dict]:
    """Large initializers whose bytes an earlier model of the bundle already wrote now name that
    file and range (ONNX external data may point into any file beside the model) instead of
    holding a copy; returns the bytes saved and, for the others, name -> content key."""
    import hashlib

    from onnx.external_data_helper import set_external_data

    shared, new = 0, {}
    for t in model.graph.initializer:
        if not t.HasField("raw_data") or len(t.raw_data) < EXTERNAL_DATA_THRESHOLD:
            continue
        key = (t.data_type, tuple(t.dims), hashlib.sha256(t.raw_data).hexdigest())
        if key in written:
            shared += len(t.raw_data)
            set_external_data(t, **written[key])
            t.ClearField("raw_data")
        else:
            new[t.name] = key
    return shared, new


def matmul_nbits_block(w) -> int:
    """MatMulNBits' block size for a planned int4 weight: the rule's group, or for one scale per output
    channel (a width no allowed group divides) the smallest power of two >= 16 that covers the whole
    input width; MatMulNBits pads the last block of a row with zeros."""
    if w.group_size != "channel":
        return w.group_size
    return max(16, 1 << (w.shape[-1] - 1).bit_length())


class OnnxRuntime:
    """ONNX models of the components in ONNX Runtime (CPU); the host keeps the decoder's KV cache.
    A decoder in parts (``decoder_parts``) runs them in order, each with its own layers' caches."""

    def __init__(
        self,
        files: dict[str, Path],
        cache_shape: list[int],
        max_context: int,
        prefill_chunk: int,
        decoder_parts: list[Path] | None = None,
    ) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if decoder_parts:
            files = {n: f for n, f in files.items() if n != "text_decoder"}
        self.sessions = {
            name: ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"]) for name, f in files.items()
        }
        self.decoder = (
            [ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"]) for f in decoder_parts]
            if decoder_parts
            else [self.sessions["text_decoder"]]
        )
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.cache_names = [[i.name for i in s.get_inputs()][3:] for s in self.decoder]
        self.cache_shape = cache_shape
        built = {tuple(i.shape) for s in self.decoder for i in s.get_inputs()[3:]}
        if built != {tuple(cache_shape)} or cache_shape[2] != max_context:
            # the manifest is not hashed: the models' own cache inputs bound the positions used
            raise BundleError(
                "manifest disagrees with the decoder's KV cache inputs",
                field="shapes.max_context",
                expected=f"cache shape {sorted(built)}",
                got=f"{cache_shape}, max_context {max_context}",
                fix="re-export the bundle with autoglm-export",
            )
        self.reset()

    @classmethod
    def from_bundle(cls, bundle: Path, manifest: dict) -> "OnnxRuntime":
        for comp in manifest["components"].values():
            for entry in comp.get("programs") or [comp]:
                load_checked_graph(bundle, entry)
        files = {name: bundle / comp["file"] for name, comp in manifest["components"].items()}
        shape = manifest["components"]["text_decoder"]["state"]["kv_cache"]["shape"]
        shapes = manifest["shapes"]
        return cls(files, shape, shapes["max_context"], shapes["prefill_chunk"], decoder_part_paths(bundle, manifest))

    def reset(self) -> None:
        self.caches = [[np.zeros(self.cache_shape, np.float32) for _ in names] for names in self.cache_names]

    def token_embedding(self, input_ids):
        return torch.from_numpy(self.sessions["token_embedding"].run(None, {"input_ids": input_ids.numpy()})[0])

    def vision_encoder(self, pixel_values, method: str = "vision_encoder"):
        return torch.from_numpy(self.sessions[method].run(None, {"pixel_values": pixel_values.numpy()})[0])

    def audio_encoder(self, input_features):
        return torch.from_numpy(self.sessions["audio_encoder"].run(None, {"input_features": input_features.numpy()})[0])

    def text_decoder(self, embeds, position_ids, cache_position):
        x = embeds.numpy()
        for i, session in enumerate(self.decoder):
            feeds = {
                "inputs_embeds": x,
                "position_ids": position_ids.numpy(),
                "cache_position": cache_position.numpy(),
                **dict(zip(self.cache_names[i], self.caches[i])),
            }
            x, *self.caches[i] = session.run(None, feeds)
        return torch.from_numpy(x)

    def close(self) -> None:
        """Nothing to end: the runtime lives in this process."""
