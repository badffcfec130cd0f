"""Graph rewrites for NPU-bound ONNX models."""

from __future__ import annotations


def fuse_rms_norm(model) -> int:
    """Fuse ``Pow(x, 2) -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x) -> Mul(w)`` (torch's
    rms_norm as exported) into ``SimplifiedLayerNormalization(x, w)``, which the QNN EP maps to one
    RmsNorm op. Measured on the tiny decoder: without it, the HTP's quantized Sqrt/Reciprocal put
    the emulator 15.5 dB from the same QDQ model on the CPU after a norm of small activations;
    fused, 37 dB. Returns the number of norms fused."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def sole(name, op):
        u = users.get(name, [])
        return u[0] if len(u) == 1 and u[0].op_type == op else None

    replace, drop = {}, set()
    for p in g.node:
        two = value(p.input[1]) if p.op_type == "Pow" else None
        if two is None or float(two.ravel()[0]) != 2.0:
            continue
        x = p.input[0]
        rm = sole(p.output[0], "ReduceMean")
        add = rm and sole(rm.output[0], "Add")
        sqrt = add and sole(add.output[0], "Sqrt")
        rec = sqrt and sole(sqrt.output[0], "Reciprocal")
        mul = rec and sole(rec.output[0], "Mul")
        mulw = mul and sole(mul.output[0], "Mul")
        if not mulw or x not in mul.input:
            continue
        eps = value(add.input[1])
        weight = [i for i in mulw.input if i != mul.output[0]][0]
        if eps is None or weight not in inits:
            continue
        drop |= {id(n) for n in (p, rm, add, sqrt, rec, mul)}
        replace[id(mulw)] = helper.make_node(
            "SimplifiedLayerNormalization",
            [x, weight],
            [mulw.output[0]],
            name=(mulw.name or "rms") + "_fused",
            axis=-1,
            epsilon=float(eps.ravel()[0]),
            stash_type=1,
        )
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    return len(replace)
