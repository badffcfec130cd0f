"""Context planning for QNN (no lowering): packing blocks under max_context_bytes, the 9B-shaped
decoder's split, and the one-line error when a single block cannot fit."""

from __future__ import annotations

import pytest

from autoglm_export.errors import ExportError
from autoglm_export.targets.qnn.contexts import HTP_CONTEXT_LIMIT, plan_contexts
from autoglm_export.quantize import ComponentPlan, WeightPlan


def decoder_plan(layers: int, hidden: int, inter: int, kv: int, vocab: int) -> ComponentPlan:
    """A text-decoder plan with GLM-4's weight names and the shipped qnn rule set."""
    w = {}

    def add(name, scheme, shape):
        params = 1
        for d in shape:
            params *= d
        w[name] = WeightPlan(f"text_decoder.{name}", scheme, 32 if scheme == "int4" else None, 0, params, shape)

    for i in range(layers):
        p = f"layers.{i}."
        add(p + "self_attn.q_proj.weight", "int4", (hidden, hidden))
        add(p + "self_attn.k_proj.weight", "int4", (kv, hidden))
        add(p + "self_attn.v_proj.weight", "int4", (kv, hidden))
        add(p + "self_attn.o_proj.weight", "int4", (hidden, hidden))
        add(p + "mlp.gate_up_proj.weight", "int4", (2 * inter, hidden))
        add(p + "mlp.down_proj.weight", "int4", (hidden, inter))
        add(p + "input_layernorm.weight", "fp32", (hidden,))
    add("norm.weight", "fp32", (hidden,))
    add("lm_head.weight", "int8", (vocab, hidden))
    return ComponentPlan("text_decoder", "fp32", w)


def test_9b_decoder_needs_two_contexts_with_sharing_and_more_without():
    plan = decoder_plan(40, 4096, 13696, 256, 151552)
    shared = plan_contexts(plan, graphs=2, max_bytes=3_600_000_000, weight_sharing=True, recipe_file="r.yaml")
    assert len(shared.groups) == 2 and shared.groups[0][0] == 0 and shared.groups[-1][-1] == "post"
    assert [u for g in shared.groups for u in g] == list(range(40)) + ["post"]  # every unit once, in order
    assert all(b <= 3_600_000_000 for b in shared.estimated_bytes)
    assert 4.5e9 < sum(shared.estimated_bytes) < 5.0e9  # int4 layers ~4.1 GB + int8 lm_head 0.62 GB
    unshared = plan_contexts(plan, graphs=2, max_bytes=3_600_000_000, weight_sharing=False, recipe_file="r.yaml")
    assert len(unshared.groups) == 3 and sum(unshared.estimated_bytes) == 2 * sum(shared.estimated_bytes)
    assert 3_600_000_000 < HTP_CONTEXT_LIMIT


def test_greedy_packing_keeps_order_and_respects_the_limit():
    plan = decoder_plan(6, 64, 128, 32, 512)
    layer = sum(w.params for n, w in plan.weights.items() if n.startswith("layers.0.") and w.scheme == "int4") / 2 + 64
    ctx = plan_contexts(plan, graphs=1, max_bytes=int(2.5 * layer), weight_sharing=False, recipe_file="r.yaml")
    assert ctx.groups[:3] == [[0, 1], [2, 3], [4, 5]] and ctx.groups[-1] == ["post"]
    assert ctx.group_of_block(3) == 1 and ctx.group_of_block("post") == len(ctx.groups) - 1


def test_a_block_larger_than_the_limit_is_a_one_line_error():
    plan = decoder_plan(2, 64, 128, 32, 512)
    with pytest.raises(ExportError) as e:
        plan_contexts(plan, graphs=2, max_bytes=1000, weight_sharing=False, recipe_file="r.yaml")
    line = e.value.one_line()
    assert "r.yaml" in line and "qnn.max_context_bytes" in line and "\n" not in line
    # the size in bytes, which a small context needs (it once said "~0.0 MB" for 49,664 bytes)
    need = e.value.expected.removeprefix(">= ")
    assert f"alone needs ~{int(need):,} bytes" in line, line
