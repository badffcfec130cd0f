"""Edge-graph rewrites that let the XNNPACK partitioner take what torch.export spells in ops it
refuses; run before partitioning (``to_edge_transform_and_lower``'s transform passes).

Without them (and the gate/up split, which the target removes before export:
``TextMLP.split_fused_projections``) a decoder layer left 15 ops on the portable kernels (reshapes
naming the dynamic token count, the no-op and constant broadcasts of ``torch.matmul``'s
decomposition) and was cut into 8 delegates; every cut is a copy between delegate and portable
memory and, at export, one more partition pass over the whole graph (docs/benchmarks.md). Each
rewrite gives the same values: every output element is the same dot product of the same numbers.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node


def _ops():
    from executorch.exir.dialects._ops import ops as exir_ops

    aten = exir_ops.edge.aten
    return aten.view_copy.default, aten.expand_copy.default, aten.bmm.default, aten.mm.default


def _shape(node: Node) -> tuple:
    return tuple(node.meta["val"].shape)


def _fake_value(op, *args):
    """``op``'s output metadata, computed on the inputs' fake tensors (symbolic sizes kept)."""
    from torch._guards import detect_fake_mode

    vals = [a.meta["val"] if isinstance(a, Node) else a for a in args]
    with detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)]):
        return op(*vals)


def _call(graph, op, args: tuple, like: Node) -> Node:
    node = graph.call_function(op, args)
    node.meta = {**like.meta, "val": _fake_value(op, *args)}
    return node


def constant_broadcast_as_mm(gm: GraphModule) -> int:
    """``bmm(A [B, n, k], view(expand(W [k, m])))`` -> ``view(mm(view(A, [-1, k]), W), [B, -1, m])``.

    ``x @ R`` with a 2-D constant (the rotary turn ``rope_rot``) decomposes into a broadcast of R to
    every head, which XNNPACK has no op for; one matrix product over all rows needs none."""
    view, expand, bmm, mm = _ops()
    done = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != bmm:
            continue
        a, b = node.args
        if b.target != view or b.args[0].target != expand:
            continue
        w = b.args[0].args[0]
        batch = _shape(a)[0]
        # only a broadcast that adds batch dims: W itself must be each batch's matrix unchanged
        if len(_shape(w)) != 2 or _shape(b)[1:] != _shape(w) or not isinstance(batch, int):
            continue
        k, m = _shape(w)
        with graph.inserting_before(node):
            rows = _call(graph, view, (a, [-1, k]), node)
            prod = _call(graph, mm, (rows, w), node)
            out = _call(graph, view, (prod, [batch, -1, m]), node)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        done += 1
    return done


def named_dynamic_reshapes(gm: GraphModule) -> int:
    """A reshape whose one dynamic size is spelled as the symbol (``[1, s0, 32, 128]``) gets ``-1``
    there (XNNPACK's static reshape infers one size, never reads a symbol); a broadcast to the
    shape its input already has is dropped."""
    view, expand, _, _ = _ops()
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == view:
            shape = list(node.args[1])
            symbolic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
            if len(symbolic) == 1 and -1 not in shape:
                shape[symbolic[0]] = -1
                node.args = (node.args[0], shape)
                done += 1
        elif node.target == expand and _shape(node) == _shape(node.args[0]):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            done += 1
    return done


def xnnpack_friendly(gm: GraphModule):
    """The transform pass: both rewrites, then the symbol reads they orphaned removed."""
    from executorch.exir.pass_base import PassResult

    changed = bool(constant_broadcast_as_mm(gm) + named_dynamic_reshapes(gm))
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, changed)
