"""The qnn reference (the PT2E simulation) held and run lean: large weights dequantized where
read, equal constants held once — with the values of the graph convert_pt2e returned."""

from __future__ import annotations

import gc

import torch
import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)

from autoglm_export.targets.qnn import simulation as sim

DQ = torch.ops.quantized_decomposed.dequantize_per_channel.default


class _Converted(torch.nn.Module):
    """The shape of a converted PT2E graph: an int8 table looked up, an int8 lm_head read by a linear."""

    def __init__(self, seed: int = 0, rows: int = 300, width: int = 48) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randint(-128, 128, (500, width), generator=g, dtype=torch.int8))
        self.register_buffer("table_scales", torch.rand(500, generator=g) * 0.01 + 1e-3)
        self.register_buffer("table_zps", torch.randint(-3, 3, (500,), generator=g))
        self.register_buffer("head", torch.randint(-8, 8, (rows, width), generator=g, dtype=torch.int8))
        self.register_buffer("head_scales", torch.rand(rows, generator=g) * 0.01 + 1e-3)
        self.register_buffer("head_zps", torch.zeros(rows, dtype=torch.int64))
        self.register_buffer("bias", torch.randn(rows, generator=g))

    def forward(self, ids, x):
        table = DQ(self.table, self.table_scales, self.table_zps, 0, -128, 127, torch.int8)
        h = torch.ops.aten.embedding.default(table, ids)
        head = DQ(self.head, self.head_scales, self.head_zps, 0, -8, 7, torch.int8)
        return h, torch.ops.aten.linear.default(h + x, head, self.bias)


def _graph(module):
    ids = torch.tensor([[0, 499, 7, 7, 123]])
    x = torch.randn(1, 5, module.table.shape[1], generator=torch.Generator().manual_seed(1))
    return torch.export.export(module, (ids, x), strict=False).module(), (ids, x)


def test_large_weights_are_dequantized_where_read_with_the_same_values(monkeypatch):
    monkeypatch.setattr(sim, "LARGE_WEIGHT_ELEMENTS", 64 * 48)  # both weights count as large; 64 rows a block
    gm, args = _graph(_Converted())
    want_h, want = gm(*args)
    seen = []
    whole = sim.dequantize_rows

    def recorded(codes, *a, **k):
        seen.append(tuple(codes.shape))
        return whole(codes, *a, **k)

    assert sim.dequantize_where_read(gm) == 2
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert DQ not in targets and sim.embedding_rows in targets and sim.linear_in_row_blocks in targets
    monkeypatch.setattr(sim, "dequantize_rows", recorded)
    got_h, got = gm(*args)
    # the looked-up rows only (5 ids), then the lm_head in blocks of 64 output rows (300 = 4 x 64 + 44)
    assert seen == [(5, 48), (64, 48), (64, 48), (64, 48), (64, 48), (44, 48)]
    assert torch.equal(got_h, want_h)  # dequantize is elementwise per row: the same floats
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the same sums, blocked by output row


def test_rows_dequantize_to_the_ops_floats():
    """int8 and int4-range codes, zero points on both sides of 0, scales over six decades."""
    g = torch.Generator().manual_seed(3)
    for lo, hi in ((-128, 127), (-8, 7)):
        codes = torch.randint(lo, hi + 1, (257, 33), generator=g, dtype=torch.int8)
        scales = torch.exp(torch.empty(257).uniform_(-14, 0, generator=g))
        zps = torch.randint(-5, 6, (257,), generator=g)
        for zp in (zps, zps.to(torch.int32), torch.zeros(257, dtype=torch.int64)):
            want = DQ(codes, scales, zp, 0, lo, hi, torch.int8)
            assert torch.equal(sim.dequantize_rows(codes, scales, zp), want)
            assert torch.equal(sim.dequantize_rows(codes, scales, zp, torch.float16), want.to(torch.float16))


def test_small_weights_and_other_readers_are_left_as_they_are(monkeypatch):
    gm, args = _graph(_Converted())
    code = gm.code
    assert sim.dequantize_where_read(gm) == 0 and gm.code == code  # under LARGE_WEIGHT_ELEMENTS
    monkeypatch.setattr(sim, "LARGE_WEIGHT_ELEMENTS", 1)

    class Transposed(_Converted):  # a dequantized weight read by something else than embedding / linear
        def forward(self, ids, x):
            head = DQ(self.head, self.head_scales, self.head_zps, 0, -8, 7, torch.int8)
            return x @ head.t()

    other, _ = _graph(Transposed())
    code = other.code
    assert sim.dequantize_where_read(other) == 0 and other.code == code


def test_equal_constants_are_held_once_and_the_pool_keeps_nothing_alive(monkeypatch):
    monkeypatch.setattr(sim, "SHARED_MIN_ELEMENTS", 100)
    pool = {}
    a, args = _graph(_Converted(seed=0))
    b, _ = _graph(_Converted(seed=0))  # the same codes (prefill / decode graphs, image buckets)
    c, _ = _graph(_Converted(seed=1))  # other codes of the same shapes (and the same all-zero head_zps)
    want = b(*args)
    big = [n for n, t in a.named_buffers() if t.numel() >= 100]
    equal_in_c = [n for n in big if torch.equal(a.get_buffer(n), c.get_buffer(n))]
    assert len(big) == 7 and equal_in_c == ["head_zps"]
    assert sim.share_constants(a, pool) == 0
    saved = sim.share_constants(b, pool)
    assert sim.share_constants(c, pool) == 300 * 8
    assert saved == sum(a.get_buffer(n).numel() * a.get_buffer(n).element_size() for n in big)
    assert all(a.get_buffer(n) is b.get_buffer(n) for n in big)
    assert [n for n in big if a.get_buffer(n) is c.get_buffer(n)] == ["head_zps"]
    for x, y in zip(b(*args), want, strict=True):
        assert torch.equal(x, y)
    del a, b, c
    gc.collect()
    assert all(ref() is None for refs in pool.values() for ref in refs)
