"""--target xnnpack: one ExecuTorch program with the XNNPACK delegate (any arm64 phone's CPU).

INT4 / INT8 linears run as XNNPACK's dynamically-quantized int8-activation kernels (8da4w,
8da8w); INT4 / INT8 embeddings as ExecuTorch's quantized embedding kernels. Recipes and numbers
behind these choices: docs/benchmarks.md.

With ``lowering.external_weights`` each program's weights (the XNNPACK delegate's constants and
the ones left to portable kernels) go to a ``.ptd`` file beside its ``.pte`` (ExecuTorch's
program-data separation), which runtimes load as the program's named data map.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ...bundle import part_file
from ...errors import ExportError
from ..contract import Target
from ..shared.executorch import ExecuTorchRuntime, contract_check, delegation_stats, export_component, metadata_methods
from ..shared.export_caches import release_export_caches
from .graph_passes import xnnpack_friendly

PTE = "model.pte"


class XnnpackTarget(Target):
    runtime_name = "ExecuTorch C++ runtime (Python bindings; XNNPACK delegate, host CPU)"
    external_weights = False

    def configure(self, rec, recipe_file: str, **_) -> None:
        self.external_weights = rec.lowering.external_weights

    def check_plans(self, plans: dict, recipe_file: str, parts: list | None = None) -> None:
        pass  # every scheme and group size of the recipe schema has an XNNPACK kernel

    def torchao_config(self, scheme: str, group_size: int | None, module: torch.nn.Module):
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerAxis, PerGroup

        grouped = scheme == "int4" and group_size != "channel"  # "channel": a weight no allowed group divides
        granularity = PerGroup(group_size) if grouped else PerAxis(0)
        wdtype = torch.int4 if scheme == "int4" else torch.int8
        if isinstance(module, torch.nn.Embedding):
            return IntxWeightOnlyConfig(weight_dtype=wdtype, granularity=granularity)
        # XNNPACK stores group-wise scales as bf16 (executorch node_visitor.get_quant_params); rounding
        # them here keeps the PyTorch reference bit-for-bit on the weights the phone will use.
        scale_dtype = torch.bfloat16 if grouped else None
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=wdtype, weight_granularity=granularity, weight_scale_dtype=scale_dtype
        )

    def export(self, name: str, module: torch.nn.Module, prefill_chunk: int):
        for sub in list(module.modules()):  # see TextMLP.split_fused_projections
            if hasattr(sub, "split_fused_projections"):
                sub.split_fused_projections()
        return export_component(name, module, prefill_chunk)

    def lower(self, programs: dict, model_meta: dict, out_dir: Path, progress, plans: dict) -> dict:
        progress(f"to_edge + XNNPACK partitioning of {len(programs)} method(s)")
        stats, data = _lower_to_pte(
            programs, metadata_methods(model_meta), out_dir / PTE, progress, self.external_weights
        )
        where = {"file": PTE, **({"data_file": data} if data else {})}
        return {
            "files": [PTE, *([data] if data else [])],
            "methods": {name: {**where, "delegation": stats[name]} for name in programs},
        }

    def lower_part(self, name: str, program, layers: tuple[int, int], out_dir: Path, progress, plan) -> dict:
        """One part of the decoder (``recipe.lowering``) as its own ``.pte`` with one method ``name``."""
        a, b = layers
        file = part_file(name, layers, "pte")
        progress(f"to_edge + XNNPACK partitioning of {name} layers {a}..{b - 1} -> {file}")
        stats, data = _lower_to_pte({name: program}, {}, out_dir / file, progress, self.external_weights)
        return {
            "file": file,
            **({"data_file": data} if data else {}),
            "files": [file, *([data] if data else [])],
            "method": name,
            "layers": [a, b],
            "delegation": stats[name],
        }

    def contract_checks(self, runtime: ExecuTorchRuntime, manifest: dict) -> list[dict]:
        return [contract_check(runtime, manifest)]

    def open_runtime(self, bundle: Path, manifest: dict) -> ExecuTorchRuntime:
        return ExecuTorchRuntime.from_bundle(bundle, manifest, PTE)

    def versions(self) -> dict:
        from importlib.metadata import version

        return {p: version(p) for p in ("executorch", "torch", "torchao")}


def _tag_delegate_constants(tag: str):
    """A transform pass that sends the XNNPACK delegate's constants to the data file ``tag``.

    XNNPACK reads the tag from a placeholder's ``meta["custom"]`` when it serializes that
    placeholder as constant data; on a runtime input it is never read. Tagging after the edge
    conversion (not on the ATen program, as ExecuTorch's Llama export does) keeps it through the
    decompositions, which rebuild placeholder metadata, without a second torch.export."""
    from executorch.exir.pass_base import PassResult

    def tag_pass(gm):
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                node.meta.setdefault("custom", {})["delegate_constant_tag"] = tag
        return PassResult(gm, True)

    return tag_pass


def _external_constant_tagger(tag: str):
    """ExecuTorch's ``external_constants`` callable: the constants left to portable kernels go to
    the data file ``tag``, but only the first method's constant of each name.

    A ``.ptd`` keys a constant by its name alone, and the methods of one program reuse names
    (``_prop_tensor_constant3`` in the vision and the audio encoder, the encoders' ``layers.0.*``):
    the second would overwrite the first's entry, and a method would load another method's data —
    an error when the dtypes differ (measured: the audio encoder's fp16 table got the vision
    encoder's fp32 one), wrong numbers when they do not. A repeated name stays in the ``.pte``."""
    owner: dict[str, int] = {}

    def tag_of(node):
        graph = id(node.graph)
        return tag if owner.setdefault(str(node.target), graph) == graph else None

    return tag_of


def _lower_to_pte(
    programs: dict, constant_methods: dict, path: Path, progress, external: bool = False
) -> tuple[dict, str | None]:
    """to_edge + XNNPACK partitioning + emission of ``programs`` into one ``.pte`` at ``path`` (and,
    ``external``, their weights into ``path.stem + ".ptd"``); returns delegation statistics per
    method and the data file's name or None."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  torchao out-variants
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    tag = path.stem if external else None
    edge = to_edge_transform_and_lower(
        programs,
        transform_passes=[xnnpack_friendly, *([_tag_delegate_constants(tag)] if tag else [])],
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods=constant_methods or None,
    )
    stats = {name: delegation_stats(edge.exported_program(name)) for name in programs}
    progress(f"emitting {path.name}")
    with warnings.catch_warnings():
        # emitted for every mutable buffer, even those InitializedMutableBufferPass handles
        warnings.filterwarnings("ignore", message="Mutation on a buffer in the model is detected")
        et = edge.to_executorch(
            ExecutorchBackendConfig(
                do_quant_fusion_and_const_prop=True,
                # serialise the KV cache's zeros: uninitialised memory could hold NaN bit patterns
                passes=[InitializedMutableBufferPass(["k_cache", "v_cache"])],
                # the KV-cache write in place (index_put_): functional, each call copied every
                # layer's whole cache out and back (at 9B widths 2 x 2 MiB per layer per token)
                run_reinplace_pass=True,
                # the constants left to portable kernels (e.g. the quantized embedding table)
                external_constants=_external_constant_tagger(tag) if tag else False,
            )
        )
    del edge
    with path.open("wb") as f:  # from the program's pieces: no second copy of it in one buffer
        et.write_to_file(f)
    data = None
    if tag:
        et.write_tensor_data_to_file(str(path.parent))  # writes <tag>.ptd
        data = f"{tag}.ptd"
        if not (path.parent / data).is_file():
            raise ExportError(f"ExecuTorch wrote no {data} for {path.name}", fix="report this with the recipe used")
    del et
    release_export_caches()
    return stats, data
