"""The model adapter (issue #31, item 4): a checkpoint's family is looked up by config.json's
``model_type`` (as mlx-lm does), the family record is complete, and the stages that export and
verify (and every target) reach the model only through it."""

from __future__ import annotations

import json

import pytest

from autoglm_export.errors import CheckpointError
from autoglm_export.models import MODEL_TYPES, families, family_for_config, family_of, get_family
from autoglm_export.models.family import DECODER_FORMS, NORM_MODES
from conftest import REPO

DATA = REPO / "tests" / "data"


def test_a_family_is_found_by_model_type_then_by_architectures():
    glm = get_family("glm4v")
    config = json.loads((DATA / "glm41v_9b_config.json").read_text())
    assert family_for_config(config, DATA / "config.json") is glm
    assert family_for_config({"model_type": "glm4v"}, DATA / "config.json") is glm
    # no model_type (some exports drop it), or one this project has not seen: the architectures decide
    for model_type in (None, "glm4v_fork"):
        cfg = {"architectures": ["Glm4vForConditionalGeneration"], "model_type": model_type}
        assert family_for_config(cfg, DATA / "config.json") is glm
    spec = glm.parse_config(config, DATA / "glm41v_9b_config.json")
    assert family_of(spec) is glm and spec.model_type == "glm4v"


@pytest.mark.parametrize(
    "config",
    [
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
        {"architectures": "Glm4vForConditionalGeneration"},  # not a list
        {"architectures": [{"x": 1}], "model_type": ["glm4v"]},  # wrong types everywhere
        {"model_type": "x" * 5000},
    ],
)
def test_an_unknown_model_is_a_one_line_error_listing_the_supported_ones(config, tmp_path):
    with pytest.raises(CheckpointError) as e:
        family_for_config(config, tmp_path / "config.json")
    msg = str(e.value)
    assert "\n" not in msg and "config.json" in msg and "architectures" in msg
    assert "model_type 'glm4v' (Glm4vForConditionalGeneration)" in msg
    assert len(msg) < 800  # a bounded excerpt of what it rejects


@pytest.mark.parametrize("family", families(), ids=lambda f: f.name)
def test_every_family_record_is_complete(family, tmp_path):
    """What the pipeline, the verifier and each target ask of a family, checked on its real-size
    config built on the meta device (no weights)."""
    import torch

    from autoglm_export.components import Shapes
    from autoglm_export.load import build_on_meta

    assert {t for t, p in MODEL_TYPES.items() if p == family.name} >= set(family.model_types)
    assert set(family.decoder_forms) == set(DECODER_FORMS)
    config = json.loads((DATA / "glm41v_9b_config.json").read_text())
    spec = family.parse_config(config, DATA / "glm41v_9b_config.json")
    shapes = Shapes(max_context=256, images=((336, 336), (728, 336)))
    layout = family.full_layout(spec)
    names = []
    for comp in family.components.for_spec(spec, shapes):
        names.append(comp.name)
        assert set(comp.keys(spec)) <= set(layout)
        io = family.component_io(comp.name, spec, shapes)  # the manifest's record of each method
        assert io["inputs"] and io["outputs"]
        module = build_on_meta(lambda c=comp: c.build(spec, shapes))
        assert family_of(module) is family  # targets find the family from the module they lower
        for mode in NORM_MODES:
            family.set_norm_mode(module, mode)
    assert names[:2] == ["vision_encoder", "vision_encoder_728x336"] and "text_decoder" in names
    part = build_on_meta(lambda: family.decoder_layers(spec, 256, (0, 1)))
    assert len(part.decoder_layers()) == 1
    for form in DECODER_FORMS:
        wrapper = family.decoder_form(form, part)
        assert isinstance(wrapper, torch.nn.Module) and family_of(wrapper) is family
    with pytest.raises(NotImplementedError):
        family.decoder_form("paged", part)
    assert family.prompt_template and family.bos_token and family.positions(spec)


def test_only_the_runtime_side_imports_a_family_package():
    """Export and verification (checkpoint, planning, pipeline, verify, inspection, targets, ...)
    reach GLM-4.1V through ``models`` alone. The runtime side (host/ and the bundle opener) is the
    GLM-4.1V prompt layout, positions and image processor that the apps port as well."""
    from test_target_contract import _imports

    runtime_side = ("autoglm_export.host.", "autoglm_export.opened_bundle")
    packages = {f"autoglm_export.models.{p}" for p in MODEL_TYPES.values()}
    for name, deps in _imports().items():
        if name.startswith("autoglm_export.models.") or name.startswith(runtime_side):
            continue
        for dep in deps:
            assert not any(dep == p or dep.startswith(p + ".") for p in packages), f"{name} imports {dep}"
