"""Grouped-query attention without expanded keys/values (issue #28): the same numbers as repeating
the KV heads, and no tensor of the expanded cache's shape anywhere in the exported decoder."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("T", [1, 5])
def test_grouped_attention_equals_repeated_kv_heads(T):
    from autoglm_export.models.glm4v.blocks import attention, group_mask, grouped_attention, repeat_kv

    g = torch.Generator().manual_seed(T)
    q, k, v = (
        torch.randn(1, 8, T, 16, generator=g),
        torch.randn(1, 2, 32, 16, generator=g),
        torch.randn(1, 2, 32, 16, generator=g),
    )
    mask = torch.where(torch.rand(1, 1, T, 32, generator=g) > 0.3, 0.0, -1e9)
    want = attention(q, repeat_kv(k, 4), repeat_kv(v, 4), mask, 0.25)
    got = grouped_attention(q, k, v, group_mask(mask, 4), 0.25)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_exported_decoder_never_materialises_the_expanded_cache(tiny_ckpt):
    from autoglm_export.checkpoint import open_checkpoint
    from autoglm_export.load import build_on_meta, load_component
    from autoglm_export.models.glm4v.text import TextDecoder

    ckpt = open_checkpoint(tiny_ckpt)
    t = ckpt.spec.text
    assert t.num_heads > t.num_kv_heads  # the tiny checkpoint is grouped (4 query heads, 2 KV heads)
    decoder = load_component(build_on_meta(lambda: TextDecoder(ckpt.spec, 128)), ckpt)
    program = torch.export.export(decoder, decoder.example_inputs(length=1), strict=True)
    expanded = (1, t.num_heads, 128, t.head_dim)
    shapes = {tuple(n.meta["val"].shape) for n in program.graph.nodes if hasattr(n.meta.get("val"), "shape")}
    assert {(t.num_kv_heads, t.head_dim, 128), (t.num_kv_heads, 128, t.head_dim)} <= shapes  # the cache itself
    assert expanded not in shapes and (1, t.num_heads, t.head_dim, 128) not in shapes


def test_cached_attention_reads_the_cache_as_it_lies(tiny_ckpt):
    """The state's layout (keys [kv, d, C], values [kv, C, d]) is what the batched matmuls take:
    after decomposition each cache write feeds a bmm directly, no reshape or transpose of the
    cache between (XNNPACK copied the whole cache for each: 0.31 of 0.57 ms per layer at 9B
    widths); and it computes what ``grouped_attention`` does on the [1, kv, C, d] form."""
    from autoglm_export.checkpoint import open_checkpoint
    from autoglm_export.load import build_on_meta, load_component
    from autoglm_export.models.glm4v.blocks import cached_attention, group_mask, grouped_attention
    from autoglm_export.models.glm4v.text import TextDecoder

    g = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(1, 8, 3, 16, generator=g),
        torch.randn(1, 2, 32, 16, generator=g),
        torch.randn(1, 2, 32, 16, generator=g),
    )
    mask = group_mask(torch.where(torch.rand(1, 3, 32, generator=g) > 0.3, 0.0, -1e9), 4)
    got = cached_attention(q, k[0].transpose(1, 2).contiguous(), v[0].contiguous(), mask, 0.25)
    assert torch.allclose(got, grouped_attention(q, k, v, mask, 0.25), atol=1e-6, rtol=0)

    ckpt = open_checkpoint(tiny_ckpt)
    decoder = load_component(build_on_meta(lambda: TextDecoder(ckpt.spec, 128)), ckpt)
    program = torch.export.export(decoder, decoder.example_inputs(length=1), strict=True).run_decompositions()
    writes = [
        n for n in program.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.index_put.default
    ]
    assert len(writes) == 2 * ckpt.spec.text.num_layers
    for w in writes:
        readers = {u.target for u in w.users if u.op == "call_function"} - {
            torch.ops.aten._assert_tensor_metadata.default
        }
        assert readers == {torch.ops.aten.bmm.default}, readers
