"""The gate/up split the xnnpack target exports (issue #28 item 1) gives the fused projection's
outputs. The delegation itself (every op of a decoder layer in the XNNPACK delegate but the two
KV-cache writes, written in place) is checked on the shared tiny bundle: test_xnnpack_bundle's
test_manifest_contract; its parity gates check the outputs."""

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
