"""QNN context planning: which blocks of a component go into which HTP context.

A QNN HTP context binary cannot pass 4 GB (the 9B decoder's int4 weights alone are ~4.1 GB plus a
0.6 GB lm_head), so each component is cut into consecutive *units* — what comes before its first
repeated block, each block (``layers.N`` / ``blocks.N``), what comes after the last — and the
units are packed in order into groups whose estimated weight bytes stay under
``qnn.max_context_bytes``. Every graph of the component (prefill and decode) is cut at the same
unit boundaries, and ExecuTorch compiles partition *i* of every graph into context *i*, so the
prefill and decode graphs of a group live in one context (with ``weight_sharing``, one copy of its
weights). The cuts are delegation tags set by ``GroupPartitioner``: the method runs its contexts
back to back with no operator outside the delegate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import ExportError
from ...quantize import ComponentPlan, WeightPlan

HTP_CONTEXT_LIMIT = 4 * 1024**3  # bytes; QNN HTP cannot map a larger context binary
_BLOCK = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.")


def htp_weight_bytes(w: WeightPlan, quantized_component: bool) -> float:
    """Bytes a weight takes in an HTP context: int4/int8 codes; fp16 components in fp16; float
    weights of an integer component become 8-bit QDQ (PT2E 16a8w default)."""
    if w.scheme == "int4":
        return w.params / 2
    if w.scheme == "int8" or quantized_component:
        return float(w.params)
    return 2.0 * w.params


def unit_of(weight_name: str, first_block_seen: bool) -> int | str:
    m = _BLOCK.search(weight_name)
    if m:
        return int(m.group(1))
    return "post" if first_block_seen else "pre"


@dataclass(frozen=True)
class ContextPlan:
    component: str
    groups: list[list]  # units per context, in order: "pre", block indices, "post"
    estimated_bytes: list[int]  # weight bytes per context, counting every graph that keeps its own copy
    max_bytes: int
    weight_sharing: bool

    def group_of_block(self, block: int | str) -> int:
        for i, units in enumerate(self.groups):
            if block in units:
                return i
        raise KeyError(block)

    def to_json(self) -> dict:
        return {
            "contexts": len(self.groups),
            "max_context_bytes": self.max_bytes,
            "weight_sharing": self.weight_sharing,
            "groups": [
                {"units": [str(u) for u in units], "estimated_weight_bytes": b}
                for units, b in zip(self.groups, self.estimated_bytes)
            ],
        }


def plan_contexts(
    plan: ComponentPlan, graphs: int, max_bytes: int, weight_sharing: bool, recipe_file: str
) -> ContextPlan:
    """Pack the component's units, in order, into as few contexts under ``max_bytes`` as greedy
    packing gives. Without weight sharing each of the ``graphs`` graphs of a context holds its own
    copy of the weights."""
    copies = 1 if weight_sharing else graphs
    sizes: dict[int | str, float] = {}
    seen_block = False
    for name, w in plan.weights.items():
        u = unit_of(name, seen_block)
        seen_block = seen_block or isinstance(u, int)
        sizes[u] = sizes.get(u, 0.0) + copies * htp_weight_bytes(w, plan.quantized)
    order = (
        (["pre"] if "pre" in sizes else [])
        + sorted(u for u in sizes if isinstance(u, int))
        + (["post"] if "post" in sizes else [])
    )
    groups: list[list] = []
    totals: list[float] = []
    for u in order:
        if sizes[u] > max_bytes:
            raise ExportError(
                f"{plan.component}: unit {u!r} alone needs ~{int(sizes[u]):,} bytes in an HTP context",
                file=recipe_file,
                field="qnn.max_context_bytes",
                expected=f">= {int(sizes[u])}",
                got=max_bytes,
                fix="raise qnn.max_context_bytes (the HTP limit is 4 GiB), enable qnn.weight_sharing, or quantize that block harder",
            )
        if groups and totals[-1] + sizes[u] <= max_bytes:
            groups[-1].append(u)
            totals[-1] += sizes[u]
        else:
            groups.append([u])
            totals.append(sizes[u])
    return ContextPlan(plan.component, groups, [int(t) for t in totals], max_bytes, weight_sharing)


def _unit_of_module(path: str, units_by_module: dict[str, int | str]) -> int | str | None:
    m = _BLOCK.search(path + ".")
    if m:
        return int(m.group(1))
    for prefix, unit in units_by_module.items():
        if path == prefix or path.startswith(prefix + ".") or prefix.startswith(path + ".") and unit in ("pre", "post"):
            return unit
    return None


def node_groups(nodes: list, ctx: ContextPlan, units_by_module: dict[str, int | str]) -> dict:
    """Context index of every delegated node (topological order in ``nodes``). A node inside a
    module with weights goes with that module's unit; any other node follows its inputs (the
    latest of their contexts), and a node fed only by graph inputs and constants (a mask slice, a
    weight's dequantize) goes with the earliest context that uses it. Data therefore only flows
    from a context to a later one: the contexts run in order with no cycle."""
    group: dict = {}
    for n in nodes:
        g = None
        for path, _ in reversed(list(n.meta.get("nn_module_stack", {}).values())):
            unit = _unit_of_module(_strip_wrapper(path), units_by_module)
            if unit is not None:
                g = ctx.group_of_block(unit)
                break
        if g is None:
            fed = [group[a] for a in n.all_input_nodes if a in group]
            g = max(fed) if fed else None
        if g is not None:
            group[n] = g
    for n in reversed(nodes):
        if n not in group:
            used = [group[u] for u in n.users if u in group]
            group[n] = min(used) if used else 0
    return group


def _strip_wrapper(path: str) -> str:
    # strict export writes ``L['self'].decoder.layers[0]``; TextDecoderStatic holds the decoder as
    # ``decoder`` while the plan names weights without it
    path = re.sub(r"\[(\d+)\]", r".\1", path.removeprefix("L['self']").lstrip("."))
    return path.removeprefix("decoder.")


def units_by_module(plan: ComponentPlan) -> dict[str, int | str]:
    """Module path (as in the component's own module) -> unit, for modules that own weights."""
    out: dict[str, int | str] = {}
    seen_block = False
    for name in plan.weights:  # names inside the component, in registration order
        u = unit_of(name, seen_block)
        seen_block = seen_block or isinstance(u, int)
        out.setdefault(name.rsplit(".", 1)[0], u)
    return out


def group_partitioner(compiler_specs, ctx: ContextPlan, modules: dict[str, int | str]):
    """A QnnPartitioner that delegates exactly what QNN supports, cut into ``ctx``'s contexts."""
    from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
    from executorch.exir.backend.utils import tag_constant_data

    class GroupPartitioner(QnnPartitioner):
        def tag_nodes(self, partitions, edge_program) -> None:
            super().tag_nodes(partitions, edge_program)
            graph = edge_program.graph_module.graph
            tagged = [n for n in graph.nodes if n.op == "call_function" and "delegation_tag" in n.meta]
            if len(ctx.groups) == 1:
                return
            spec = next(iter(self.partition_tags.values()))
            groups = node_groups(tagged, ctx, modules)
            self.partition_tags.clear()
            for i in range(len(ctx.groups)):  # insertion order = context order in every method
                self.partition_tags[f"qnn_ctx{i}"] = spec
            for n, g in groups.items():
                n.meta["delegation_tag"] = f"qnn_ctx{g}"
            for n in graph.nodes:  # weights follow the context of the nodes that read them
                if n.op == "placeholder" and "delegation_tag" in n.meta:
                    if n.users:
                        del n.meta["delegation_tag"]
                    else:  # unused constants: dropped with the last context, as QnnPartitioner does
                        n.meta["delegation_tag"] = f"qnn_ctx{len(ctx.groups) - 1}"
            tag_constant_data(edge_program)

    return GroupPartitioner(compiler_specs)
