"""The decoder lowered in parts (recipe ``lowering.decoder_layers_per_program``, issue #7): the
layer ranges, the parts chained against the whole decoder in PyTorch, and which targets may ask for
it. The lowered, chained parts are gated end to end by the shared audio xnnpack bundle (conftest)."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO, one_bucket

from autoglm_export.errors import RecipeError
from autoglm_export.load import build_on_meta, load_component
from autoglm_export.models.glm4v.text import TextDecoder
from autoglm_export.pipeline import decoder_parts
from autoglm_export.recipe import load_recipe


def test_part_ranges_cover_every_layer_once():
    assert decoder_parts(40, None) == [(0, 40)]
    assert decoder_parts(40, 2) == [(a, a + 2) for a in range(0, 40, 2)]
    assert decoder_parts(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert decoder_parts(2, 8) == [(0, 2)]


def test_chained_parts_equal_the_whole_decoder(tiny_ckpt):
    """Prefill then two decode steps, each part keeping its own layers' KV cache: bit-identical
    logits, and only the last part holds the final norm and lm_head."""
    from autoglm_export.checkpoint import open_checkpoint

    ckpt = open_checkpoint(tiny_ckpt)
    spec, ctx = ckpt.spec, 32

    def build(layers):
        return load_component(build_on_meta(lambda: TextDecoder(spec, ctx, layers)), ckpt)

    whole = build(None)
    parts = [build((0, 1)), build((1, 2))]
    first = dict(parts[0].named_parameters())
    assert first and all(n.startswith("layers.0.") for n in first)
    assert "lm_head.weight" in dict(parts[1].named_parameters()) and not parts[0].has_head

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for start, length in ((0, 5), (5, 1), (6, 1)):
            embeds = torch.randn(1, length, spec.text.hidden_size, generator=g)
            pos = torch.arange(start, start + length)
            position_ids = pos.unsqueeze(0).expand(3, length).contiguous()
            want = whole(embeds, position_ids, pos)
            x = embeds
            for p in parts:
                x = p(x, position_ids, pos)
            assert x.shape == want.shape == (1, spec.text.vocab_size)
            assert torch.equal(x, want)


@pytest.mark.parametrize("target", ["onnx-qnn"])
def test_targets_that_cannot_lower_in_parts_say_so(target, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\ntarget: {target}\nlowering: {{decoder_layers_per_program: 4}}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert "lowering.decoder_layers_per_program" in str(e.value) and "supported: xnnpack, qnn, coreml, onnx" in str(
        e.value
    )


def test_parts_need_at_least_one_layer(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ntarget: xnnpack\nlowering: {decoder_layers_per_program: 0}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert "lowering.decoder_layers_per_program = 0" in str(e.value)


def test_each_parts_weights_are_freed_before_it_is_lowered(tiny_ckpt, tmp_path, monkeypatch):
    """Peak memory stays that of one part only if nothing keeps a part's module (or an exporter's
    copy of it) alive into its lowering and beyond: the onnx exporter's module sits in reference
    cycles, and torch/onnxscript keep exports in globals (``release_export_caches``)."""
    import gc
    import weakref

    from autoglm_export.targets import get_target
    from autoglm_export.pipeline import export

    tgt = get_target("onnx")
    weights: list[weakref.ref] = []
    alive_at_lowering: list[int] = []
    real_export, real_lower_part = type(tgt).export, type(tgt).lower_part

    def spy_export(self, name, module, prefill_chunk):
        if name == "text_decoder":
            weights.extend(weakref.ref(p) for p in module.parameters())
        return real_export(self, name, module, prefill_chunk)

    def spy_lower_part(self, *args, **kwargs):
        alive_at_lowering.append(sum(w() is not None for w in weights))
        return real_lower_part(self, *args, **kwargs)

    monkeypatch.setattr(type(tgt), "export", spy_export)
    monkeypatch.setattr(type(tgt), "lower_part", spy_lower_part)
    recipe = tmp_path / "onnx-parts.yaml"
    recipe.write_text(
        one_bucket((REPO / "recipes" / "onnx-tiny.yaml").read_text()) + "lowering:\n  decoder_layers_per_program: 1\n"
    )
    export(checkpoint=tiny_ckpt, target="onnx", out=tmp_path / "b", recipe=recipe, verify=False)
    gc.collect()
    assert len(alive_at_lowering) == 2 and len(weights) > 10
    assert alive_at_lowering == [0, 0], f"parameters of the part being lowered still alive: {alive_at_lowering}"
    assert not [w for w in weights if w() is not None], "a part's weights outlive the export"


def test_static_parts_are_calibrated_and_run_as_the_whole_decoder(tiny_ckpt):
    """qnn's decoder in parts: each part is calibrated on what the part before it computed in fp32
    (the recorded cache contents of every call equal the whole decoder's), and the host runtime
    chains the parts' static graphs to the whole decoder's logits (fp32 modules, no quantization)."""
    import numpy as np

    from autoglm_export.checkpoint import open_checkpoint
    from autoglm_export.host.generate import EagerRuntime
    from autoglm_export.targets.shared.static_graphs import StaticGraphRuntime, static_graphs

    ckpt = open_checkpoint(tiny_ckpt)
    spec, ctx, chunk = ckpt.spec, 64, 8

    def build(layers):
        return load_component(build_on_meta(lambda: TextDecoder(spec, ctx, layers)), ckpt)

    whole = static_graphs("text_decoder", build(None), chunk, {})
    state: dict = {}
    parts = [static_graphs("text_decoder", build(layers), chunk, state) for layers in ((0, 1), (1, 2))]
    assert "decoder_sequences" not in state  # handed from the first part to the last, then dropped
    for graph in ("text_decoder_prefill", "text_decoder_decode"):
        w = whole[graph].calibration
        assert len(w) >= 4 and [len(p[graph].calibration) for p in parts] == [len(w)] * 2
        for i, part in enumerate(parts):
            assert part[graph].output_names[0] == ("hidden_states", "logits")[i]
            for name in (f"k_cache_{i}", f"v_cache_{i}"):
                assert all(np.array_equal(a[name], b[name]) for a, b in zip(w, part[graph].calibration)), (graph, name)

    class Chained(StaticGraphRuntime):
        def _run(self, graph, feeds):
            g = graphs[graph]
            return [o.numpy() for o in g.module(*[torch.from_numpy(feeds[n]) for n in g.input_names])]

    files = ["text_decoder.00-00.pte", "text_decoder.01-01.pte"]
    graphs = {f"{f}:{g}": part[g] for f, part in zip(files, parts) for g in part}
    manifest = {
        "shapes": {"max_context": ctx, "prefill_chunk": chunk},
        "components": {"text_decoder": {"rope": state["rope"], "programs": [{"file": f} for f in files]}},
    }
    runtime = Chained(
        manifest, {k: [(n, list(a.shape)) for n, a in zip(g.input_names, g.args)] for k, g in graphs.items()}
    )
    eager = EagerRuntime({"text_decoder": build(None)}, ctx, chunk)
    g = torch.Generator().manual_seed(5)
    for start, length in ((0, chunk), (chunk, 3)):  # a prefill chunk, then three tokens through the decode graphs
        x = torch.randn(1, length, spec.text.hidden_size, generator=g)
        pos = torch.arange(start, start + length)
        position_ids = pos.unsqueeze(0).expand(3, length).contiguous()
        got, want = runtime.text_decoder(x, position_ids, pos), eager.text_decoder(x, position_ids, pos)
        assert got.shape == want.shape == (1, spec.text.vocab_size)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
