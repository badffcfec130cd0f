"""The decoder lowered in parts (recipe ``lowering.decoder_layers_per_program``, issue #7): the
layer ranges, the parts chained against the whole decoder in PyTorch, and which targets may ask for
it. The lowered, chained parts are gated end to end by the shared audio xnnpack bundle (conftest)."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO

from autoglm_export.errors import RecipeError
from autoglm_export.load import build_on_meta, load_component
from autoglm_export.models.glm4v.modules import TextDecoder
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


@pytest.mark.parametrize("target", ["qnn", "onnx-qnn"])
def test_targets_that_cannot_lower_in_parts_say_so(target, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\ntarget: {target}\nlowering: {{decoder_layers_per_program: 4}}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert "lowering.decoder_layers_per_program" in str(e.value) and "supported: xnnpack, onnx, coreml" in str(e.value)


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

    from autoglm_export.lower import get_backend
    from autoglm_export.pipeline import export

    backend = get_backend("onnx")
    weights: list[weakref.ref] = []
    alive_at_lowering: list[int] = []
    real_export, real_lower_part = type(backend).export, type(backend).lower_part

    def spy_export(self, name, module, prefill_chunk):
        if name == "text_decoder":
            weights.extend(weakref.ref(p) for p in module.parameters())
        return real_export(self, name, module, prefill_chunk)

    def spy_lower_part(self, *args, **kwargs):
        alive_at_lowering.append(sum(w() is not None for w in weights))
        return real_lower_part(self, *args, **kwargs)

    monkeypatch.setattr(type(backend), "export", spy_export)
    monkeypatch.setattr(type(backend), "lower_part", spy_lower_part)
    recipe = tmp_path / "onnx-parts.yaml"
    recipe.write_text((REPO / "recipes" / "onnx-tiny.yaml").read_text() + "lowering:\n  decoder_layers_per_program: 1\n")
    export(checkpoint=tiny_ckpt, target="onnx", out=tmp_path / "b", recipe=recipe, verify=False)
    gc.collect()
    assert len(alive_at_lowering) == 2 and len(weights) > 10
    assert alive_at_lowering == [0, 0], f"parameters of the part being lowered still alive: {alive_at_lowering}"
    assert not [w for w in weights if w() is not None], "a part's weights outlive the export"
