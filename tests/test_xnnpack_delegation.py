"""--target xnnpack keeps every op of a decoder layer inside the XNNPACK delegate except the two
KV-cache writes, for which XNNPACK has no op (issue #28 item 1), with the same outputs."""

from __future__ import annotations

import pytest
import torch

LAYERS = 2
CONTEXT = 64


@pytest.fixture(scope="module")
def decoder(tiny_ckpt):
    from autoglm_export.checkpoint import open_checkpoint
    from autoglm_export.load import build_on_meta, load_component
    from autoglm_export.models.glm4v.text import TextDecoder

    ckpt = open_checkpoint(tiny_ckpt)
    assert ckpt.spec.text.num_layers == LAYERS
    return load_component(build_on_meta(lambda: TextDecoder(ckpt.spec, CONTEXT)), ckpt).eval()


def _quantized(decoder):
    """A copy with the default recipe's int4 linears (torchao 8da4w, groups of 32), as exported."""
    import copy

    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    q = copy.deepcopy(decoder)
    config = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(32), weight_scale_dtype=torch.bfloat16
    )
    quantize_(q, config, filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and ".layers." in f".{name}")
    return q


def _lower(module, path):
    """XnnpackTarget's export and lowering of the decoder to ``path``: delegation statistics and the
    program's operators left to portable kernels."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    from autoglm_export.targets import get_target
    from autoglm_export.targets.xnnpack.target import _lower_to_pte

    program = get_target("xnnpack").export("text_decoder", module, 8)
    stats, _ = _lower_to_pte({"text_decoder": program}, {}, path, lambda msg: None)
    plan = deserialize_pte_binary(path.read_bytes()).program.execution_plan[0]
    return stats["text_decoder"], {f"{o.name}.{o.overload}" for o in plan.operators}


def _calls(method, reference, hidden: int):
    """Prefill 5 tokens, decode 3, prefill 2 more: the largest difference and the logits' scale."""
    g = torch.Generator().manual_seed(1)
    worst = scale = pos = 0
    for T in (5, 1, 1, 1, 2):
        x = torch.randn(1, T, hidden, generator=g)
        p = torch.arange(pos, pos + T)
        args = (x, p.expand(3, T).contiguous(), p)
        got = method.execute(list(args))[0]
        with torch.no_grad():
            want = reference(*args)
        worst, scale = max(worst, (got - want).abs().max().item()), max(scale, want.abs().max().item())
        pos += T
    return worst, scale


def test_split_gate_up_projection_gives_the_same_outputs(decoder):
    import copy

    q = _quantized(decoder)
    mlp = q.layers[0].mlp
    x = torch.randn(1, 3, decoder.t.hidden_size)
    with torch.no_grad():
        fused = mlp(x)
        split = copy.deepcopy(mlp)
        split.split_fused_projections()
        assert not hasattr(split, "gate_up_proj")
        assert torch.equal(split(x), fused)  # each output is its own row's dot product


def test_decoder_layers_are_delegated_but_for_the_cache_writes(decoder, tmp_path):
    """Without the rewrites (measured: the code before them) each tiny layer left 15 ops outside
    (reshapes naming the dynamic token count, matmul broadcasts, the gate/up split) and the
    2-layer decoder was cut into 16 delegates; the same outputs either way."""
    from executorch.runtime import Runtime

    reference = _quantized(decoder)
    stats, operators = _lower(_quantized(decoder), tmp_path / "d.pte")
    assert stats["layers"]["ops_outside"] == {"aten.index_put.default": 2 * LAYERS}
    # one cut per layer at its cache writes, plus the once-per-call mask / rotary / last-position ops
    assert stats["delegates"] <= LAYERS + 3
    # the cache is written in place: the functional form copied each layer's whole cache out and back
    assert "aten::index_put_." in operators and not {"aten::index_put.out", "aten::copy_."} & operators
    method = Runtime.get().load_program(str(tmp_path / "d.pte")).load_method("text_decoder")
    worst, scale = _calls(method, reference, decoder.t.hidden_size)
    assert worst <= 1e-4 * scale, (worst, scale)
