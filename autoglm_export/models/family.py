"""The model-family contract: everything the checkpoint reader, the pipeline, the verifier and the
targets need to know about one family of checkpoints, in one frozen record per family
(``models/<package>/family.py`` defines ``FAMILY``). Nothing outside ``models/`` imports a
family's package; it asks ``models.family_for_config`` (a config.json) or ``models.family_of`` (a
spec or an export-ready module, which carry their family's name) instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:  # the lookup stays light: a family's package imports torch, this record does not
    import torch.nn as nn

    from ..components import ComponentRegistry, Shapes

# The decoder's export forms a family provides; each target asks for the one it lowers.
DECODER_FORMS = (
    "explicit_cache",  # the KV cache as inputs and outputs, dynamic token count (onnx)
    "host_cache",  # no cache writes or position math in the graph: the host passes cos/sin, mask, cache (qnn, onnx-qnn)
    "state",  # the cache as the program's state, written in place (coreml)
)
NORM_MODES = (
    "plain",  # the one RMSNorm pattern the onnx / QNN fusions match
    "scaled",  # overflow- and underflow-safe in fp16 (coreml)
)


@dataclass(frozen=True)
class ModelFamily:
    name: str  # the package under models/, and the ``family`` its specs and modules carry
    model_types: tuple[str, ...]  # config.json ``model_type`` values it reads
    architectures: tuple[str, ...]  # config.json ``architectures`` it reads (when model_type is absent or new)
    parse_config: Callable[[dict, Path, dict | None], Any]  # config.json (+ generation_config) -> the family's spec
    full_layout: Callable[[Any], dict[str, tuple[int, ...]]]  # spec -> every checkpoint key and its shape
    canonical_key: Callable[[str], str]  # a stored key (older layouts included) -> the layout's name
    components: ComponentRegistry  # the per-modality subgraphs, their builders and keys
    component_io: Callable[[str, Any, Shapes], dict]  # the manifest's inputs/outputs/state of one method
    decoder_layers: Callable[[Any, int, tuple[int, int]], nn.Module]  # (spec, max_context, [a, b)) -> decoder part
    decoder_forms: Mapping[str, Callable[[nn.Module], nn.Module]]  # DECODER_FORMS name -> wrapper of a decoder
    set_norm_mode: Callable[[nn.Module, str], None]  # a NORM_MODES name on every norm inside a module
    prompt_template: str  # the prompt layout the apps follow (manifest ``prompt.template``)
    bos_token: str  # the special token every prompt starts with (manifest ``bos_id``)
    positions: Callable[[Any], dict]  # spec -> the manifest's ``positions`` (the apps' position rule)

    def decoder_form(self, form: str, decoder: nn.Module) -> nn.Module:
        if form not in self.decoder_forms:
            raise NotImplementedError(f"model family {self.name} has no {form!r} decoder form")
        return self.decoder_forms[form](decoder)
