"""The PT2E simulation that verification runs as the qnn reference, held and run lean.

``convert_pt2e`` leaves every weight as integer codes read through a ``dequantize_per_channel``
node, which rebuilds the whole fp32 matrix on each call: the 9B's 151552 x 4096 token embedding
and lm_head, 2.3 GiB each plus the op's temporaries, for one looked-up token or one decode step.
And each graph of a component (prefill, decode) and each image bucket holds its own copy of the
same codes. Here the large weights are dequantized only where read (the looked-up rows of an
embedding; a linear a block of output rows at a time) and equal constants are held once. The
values are the op's: dequantization is elementwise per row, so the rows are the same floats
(``dequantize_rows``); a linear's outputs are the same sums computed a block of output rows at a
time, equal up to float rounding (which a 16-bit activation quantizer after it can tip by a step).
Only the reference is rewritten; the export lowers the graphs ``convert_pt2e`` returns.
"""

from __future__ import annotations

import functools
import weakref

import torch

# a weight this large (elements) is dequantized a slice of rows at a time: 64 MiB of fp32
LARGE_WEIGHT_ELEMENTS = 1 << 24
# constants this small are not worth comparing
SHARED_MIN_ELEMENTS = 1 << 16


def _dequantize():  # looked up when used: the op exists once torchao's PT2E is imported
    return torch.ops.quantized_decomposed.dequantize_per_channel.default


def dequantize_rows(codes, scales, zero_points, out_dtype=None):
    """``dequantize_per_channel`` along axis 0 in float32 arithmetic. The op subtracts in int64 (8
    bytes per weight) and then multiplies in float32; codes and zero points are small integers,
    exact in float32, so these are the same floats (tested) at a fraction of the memory traffic."""
    shape = (-1,) + (1,) * (codes.dim() - 1)
    w = codes.to(torch.float32)
    if zero_points is not None:
        w -= zero_points.to(torch.float32).view(shape)
    w *= scales.view(shape)
    return w if out_dtype in (None, torch.float32) else w.to(out_dtype)


def embedding_rows(codes, scales, zero_points, axis, quant_min, quant_max, dtype, indices, out_dtype=None):
    """``embedding(dequantize_per_channel(codes, ...), indices)`` for the looked-up rows only."""
    flat = indices.reshape(-1)
    rows = dequantize_rows(
        codes.index_select(0, flat),
        scales.index_select(0, flat),
        None if zero_points is None else zero_points.index_select(0, flat),
        out_dtype,
    )
    return rows.reshape(*indices.shape, codes.shape[1])


def linear_in_row_blocks(x, codes, scales, zero_points, axis, quant_min, quant_max, dtype, bias=None, out_dtype=None):
    """``linear(x, dequantize_per_channel(codes, ...), bias)`` a block of output rows at a time."""
    rows = max(1, LARGE_WEIGHT_ELEMENTS // max(1, codes[0].numel()))
    outs = []
    for a in range(0, codes.shape[0], rows):
        b = a + rows
        zp = None if zero_points is None else zero_points[a:b]
        w = dequantize_rows(codes[a:b], scales[a:b], zp, out_dtype)
        outs.append(torch.nn.functional.linear(x, w, None if bias is None else bias[a:b]))
    return torch.cat(outs, dim=-1)


def fetch_attr(gm, target: str):
    """What a ``get_attr`` node of ``gm`` reads (``target`` may be dotted)."""
    return functools.reduce(getattr, target.split("."), gm)


def dequantize_where_read(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``gm`` so that its large per-row-quantized weights feeding an embedding or a linear
    are dequantized where read; returns how many reads were rewritten."""
    graph, done = gm.graph, 0
    embedding, linear = torch.ops.aten.embedding.default, torch.ops.aten.linear.default
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _dequantize() or len(node.args) != 7:
            continue
        if set(node.kwargs) - {"out_dtype"}:
            continue
        codes, axis = node.args[0], node.args[3]
        if getattr(codes, "op", None) != "get_attr" or axis != 0:
            continue
        weight = fetch_attr(gm, codes.target)
        if weight.dim() != 2 or weight.numel() < LARGE_WEIGHT_ELEMENTS:
            continue
        users = list(node.users)
        fits = all(
            (u.target is embedding and u.args[0] is node and len(u.args) == 2)
            or (u.target is linear and len(u.args) >= 2 and u.args[1] is node and node not in (u.args[0], *u.args[2:]))
            for u in users
        )
        if not users or not fits:
            continue
        for u in users:
            with graph.inserting_before(u):
                if u.target is embedding:
                    new = graph.call_function(embedding_rows, (*node.args[:7], u.args[1]), dict(node.kwargs))
                else:
                    bias = u.args[2] if len(u.args) > 2 else None
                    new = graph.call_function(
                        linear_in_row_blocks, (u.args[0], *node.args[:7], bias), dict(node.kwargs)
                    )
            new.meta = dict(u.meta)
            u.replace_all_uses_with(new)
            graph.erase_node(u)
            done += 1
        graph.erase_node(node)
    if done:
        graph.lint()
        gm.recompile()
    return done


def _fingerprint(t: torch.Tensor) -> tuple:
    flat = t.reshape(-1)
    step = max(1, flat.numel() // 4096)
    return (t.dtype, tuple(t.shape), float(flat[::step].double().sum()), float(flat[-1].double()))


def share_constants(gm: torch.fx.GraphModule, pool: dict) -> int:
    """Point ``gm``'s large constants at an equal tensor already in ``pool`` (fingerprint -> weak
    references: the pool keeps nothing alive once the references are dropped), adding the ones not
    seen; returns the bytes no longer held twice."""
    saved = 0
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        t = fetch_attr(gm, node.target)
        if not isinstance(t, torch.Tensor) or t.numel() < SHARED_MIN_ELEMENTS or not t.is_contiguous():
            continue
        seen = pool.setdefault(_fingerprint(t), [])
        alive = [s for s in (ref() for ref in seen) if s is not None]
        same = next((s for s in alive if s is t or torch.equal(s, t)), None)
        if same is None:
            seen.append(weakref.ref(t))
        elif same is not t:
            owner, _, leaf = node.target.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            if isinstance(getattr(module, leaf), torch.nn.Parameter):
                setattr(module, leaf, torch.nn.Parameter(same, requires_grad=False))
            else:
                setattr(module, leaf, same)
            saved += t.numel() * t.element_size()
    return saved


def lean_simulation(gm: torch.fx.GraphModule, pool: dict) -> torch.fx.GraphModule:
    """``gm`` (a converted PT2E graph) as the reference holds and runs it: equal constants shared
    through ``pool``, large weights dequantized where read."""
    dequantize_where_read(gm)
    share_constants(gm, pool)
    return gm
