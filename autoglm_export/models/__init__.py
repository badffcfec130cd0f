"""Model families, looked up by config.json's ``model_type`` as mlx-lm does: ``MODEL_TYPES`` maps a
``model_type`` to the package under ``models/`` that reads it, and that package's ``family`` module
holds its ``ModelFamily`` record (``models/family.py``: the contract). A config without a known
``model_type`` is matched by its ``architectures``; anything else is a one-line error that lists
what is supported. Adding a family: docs/adding-a-model.md.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import CheckpointError, excerpt
from .family import ModelFamily

# config.json model_type -> package under models/
MODEL_TYPES = {"glm4v": "glm4v"}


def get_family(package: str) -> ModelFamily:
    return importlib.import_module(f"{__name__}.{package}.family").FAMILY


def families() -> list[ModelFamily]:
    return [get_family(p) for p in dict.fromkeys(MODEL_TYPES.values())]


def family_for_config(config: dict, file: Path) -> ModelFamily:
    """The family that reads this config.json: by ``model_type``, else by ``architectures``."""
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in MODEL_TYPES:
        return get_family(MODEL_TYPES[model_type])
    archs = config.get("architectures")
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    for fam in families():
        if set(archs) & set(fam.architectures):
            return fam
    supported = "; ".join(
        f"model_type {t!r} ({', '.join(get_family(p).architectures)})" for t, p in MODEL_TYPES.items()
    )
    raise CheckpointError(
        "unsupported architecture",
        file=file,
        field="architectures",
        expected=supported,
        got=excerpt(f"{config.get('architectures')!r} (model_type {model_type!r})", 120),
        fix="point --checkpoint at a GLM-4.1V / AutoGLM-Phone checkpoint (docs/adding-a-model.md for other families)",
    )


def family_of(obj) -> ModelFamily:
    """The family of a spec or of an export-ready module (both carry the family's name)."""
    return get_family(obj.family)
