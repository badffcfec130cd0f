"""GLM-4.1V as a model family (``models.family.ModelFamily``): what the checkpoint reader, the
pipeline, the verifier and the targets look up by config.json's ``model_type``."""

from __future__ import annotations

from ...components import Shapes
from ...methods import is_vision_method
from ..family import ModelFamily
from .blocks import RMSNorm
from .components import COMPONENTS
from .decoder_forms import TextDecoderExplicitCache, TextDecoderStateful, TextDecoderStatic
from .layout import canonical_key, full_layout
from .spec import ARCHITECTURE, MODEL_TYPES, ModelSpec, parse_config
from .text import TextDecoder

PROMPT_TEMPLATE = (
    "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|>×N<|end_of_image|>"
    "[<|begin_of_audio|><|audio|>×M<|end_of_audio|>]TEXT<|assistant|>\n"
)


def component_io(name: str, spec: ModelSpec, shapes: Shapes) -> dict:
    """The manifest's inputs, outputs and state of one method (docs/bundle-format.md)."""
    t, v = spec.text, spec.vision
    f32, i64 = "float32", "int64"
    if is_vision_method(name):
        h, w = shapes.bucket_methods()[name]
        n = (h // v.patch_size) * (w // v.patch_size)
        return {
            "image_size": [h, w],
            "inputs": [{"name": "pixel_values", "shape": [n, v.in_channels * v.patch_size**2], "dtype": f32}],
            "outputs": [
                {"name": "image_embeddings", "shape": [n // v.spatial_merge_size**2, t.hidden_size], "dtype": f32}
            ],
        }
    if name == "audio_encoder":
        a = spec.audio
        return {
            "inputs": [{"name": "input_features", "shape": [1, a.num_mel_bins, shapes.audio_frames], "dtype": f32}],
            "outputs": [{"name": "audio_embeddings", "shape": [shapes.audio_frames // 8, t.hidden_size], "dtype": f32}],
        }
    if name == "token_embedding":
        return {
            "inputs": [{"name": "input_ids", "shape": [1, "T"], "dtype": i64}],
            "outputs": [{"name": "embeddings", "shape": [1, "T", t.hidden_size], "dtype": f32}],
        }
    if name == "text_decoder":
        return {
            "inputs": [
                {"name": "inputs_embeds", "shape": [1, "T", t.hidden_size], "dtype": f32},
                {"name": "position_ids", "shape": [3, "T"], "dtype": i64},
                {"name": "cache_position", "shape": ["T"], "dtype": i64},
            ],
            "outputs": [{"name": "logits", "shape": [1, t.vocab_size], "dtype": f32}],
            "state": {
                "kv_cache": {
                    "layers": t.num_layers,
                    "shape": [1, t.num_kv_heads, shapes.max_context, t.head_dim],
                    "dtype": f32,
                    "note": "held inside the method; positions >= cache_position are masked",
                }
            },
        }
    raise KeyError(name)


def positions(spec: ModelSpec) -> dict:
    return {
        "scheme": "mrope-3axis",
        "mrope_section": list(spec.text.mrope_section),
        "rule": "text and audio: same position on t/h/w; image at cur: t=cur, h=cur+row, "
        "w=cur+col, then cur += max(gh, gw); decode position = cache_index + rope_delta",
    }


def set_norm_mode(module, mode: str) -> None:
    for m in module.modules():
        if isinstance(m, RMSNorm):
            setattr(m, mode, True)


FAMILY = ModelFamily(
    name="glm4v",
    model_types=MODEL_TYPES,
    architectures=(ARCHITECTURE,),
    parse_config=parse_config,
    full_layout=full_layout,
    canonical_key=canonical_key,
    components=COMPONENTS,
    component_io=component_io,
    decoder_layers=TextDecoder,  # TextDecoder(spec, max_context, layers): one part of the decoder
    decoder_forms={
        "explicit_cache": TextDecoderExplicitCache,
        "host_cache": TextDecoderStatic,
        "state": TextDecoderStateful,
    },
    set_norm_mode=set_norm_mode,
    prompt_template=PROMPT_TEMPLATE,
    bos_token="gmask",
    positions=positions,
)
