"""--target xnnpack: one ExecuTorch program with the XNNPACK delegate (any arm64 phone's CPU).

INT4 / INT8 linears run as XNNPACK's dynamically-quantized int8-activation kernels (8da4w,
8da8w); INT4 / INT8 embeddings as ExecuTorch's quantized embedding kernels. Recipes and numbers
behind these choices: DESIGN.md §2.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..bundle import part_file
from .executorch_common import ExecuTorchRuntime, contract_check, delegation_stats, export_component, metadata_methods
from .export_caches import release_export_caches

PTE = "model.pte"


class XnnpackBackend:
    name = "xnnpack"
    runtime_name = "executorch.runtime (XNNPACK delegate, host CPU)"
    quantizes_in_torch = True

    def check_plans(self, plans: dict, recipe_file: str, parts: list | None = None) -> None:
        pass

    def torchao_config(self, scheme: str, group_size: int | None, module: torch.nn.Module):
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerAxis, PerGroup

        granularity = PerGroup(group_size) if scheme == "int4" else PerAxis(0)
        wdtype = torch.int4 if scheme == "int4" else torch.int8
        if isinstance(module, torch.nn.Embedding):
            return IntxWeightOnlyConfig(weight_dtype=wdtype, granularity=granularity)
        # XNNPACK stores group-wise scales as bf16 (executorch node_visitor.get_quant_params); rounding
        # them here keeps the PyTorch reference bit-for-bit on the weights the phone will use.
        scale_dtype = torch.bfloat16 if scheme == "int4" else None
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=wdtype, weight_granularity=granularity, weight_scale_dtype=scale_dtype
        )

    def export(self, name: str, module: torch.nn.Module, prefill_chunk: int):
        return export_component(name, module, prefill_chunk)

    def lower(self, programs: dict, model_meta: dict, out_dir: Path, progress, plans: dict) -> dict:
        progress(f"to_edge + XNNPACK partitioning of {len(programs)} method(s)")
        stats = _lower_to_pte(programs, metadata_methods(model_meta), out_dir / PTE, progress)
        return {"files": [PTE], "methods": {name: {"file": PTE, "delegation": stats[name]} for name in programs}}

    def lower_part(self, name: str, program, layers: tuple[int, int], out_dir: Path, progress, plan) -> dict:
        """One part of the decoder (``recipe.lowering``) as its own ``.pte`` with one method ``name``."""
        a, b = layers
        file = part_file(name, layers, "pte")
        progress(f"to_edge + XNNPACK partitioning of {name} layers {a}..{b - 1} -> {file}")
        stats = _lower_to_pte({name: program}, {}, out_dir / file, progress)
        return {"file": file, "method": name, "layers": [a, b], "delegation": stats[name]}

    def contract_checks(self, runtime: ExecuTorchRuntime, manifest: dict) -> list[dict]:
        return [contract_check(runtime, manifest)]

    def open_runtime(self, bundle: Path, manifest: dict) -> ExecuTorchRuntime:
        return ExecuTorchRuntime.from_bundle(bundle, manifest, PTE)

    def versions(self) -> dict:
        from importlib.metadata import version

        return {p: version(p) for p in ("executorch", "torch", "torchao")}


def _lower_to_pte(programs: dict, constant_methods: dict, path: Path, progress) -> dict:
    """to_edge + XNNPACK partitioning + emission of ``programs`` into one ``.pte`` at ``path``;
    returns delegation statistics per method."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  torchao out-variants
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    edge = to_edge_transform_and_lower(
        programs,
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
            )
        )
    del edge
    path.write_bytes(et.buffer)
    del et
    release_export_caches()
    return stats


BACKEND = XnnpackBackend()
