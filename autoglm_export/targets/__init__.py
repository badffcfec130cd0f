"""Targets: one package each (``targets/<name>/``), described by one row of ``table.TARGETS`` and
built on ``contract.Target``. ``get_target`` imports a target's package only when it is asked
for, so a missing toolchain for one target never breaks another, and returns a fresh object per
export; an unknown name lists the valid ones."""

from __future__ import annotations

import importlib

from ..errors import BundleError, ExportError, excerpt
from ..progress import silent
from .contract import Capabilities, Target
from .table import TARGETS

__all__ = ["TARGETS", "Capabilities", "Target", "capabilities", "get_target", "open_bundle_runtime"]


def capabilities(name: str) -> Capabilities:
    if name in TARGETS:
        return TARGETS[name]
    raise ExportError(
        "unknown target",
        field="--target",
        expected=" | ".join(TARGETS),
        got=excerpt(repr(name), 60),
        fix="pick one of the listed targets",
    )


def get_target(name: str, *, progress=silent, verifying: bool = True) -> Target:
    caps = capabilities(name)
    module, cls = caps.entry.split(":")
    return getattr(importlib.import_module(module), cls)(caps, progress=progress, verifying=verifying)


def open_bundle_runtime(target: Target, bundle, manifest: dict):
    """``target.open_runtime`` on a bundle whose manifest passed ``load_bundle``: a program the
    runtime cannot load (truncated, or re-hashed after tampering) is a one-line bundle error."""
    try:
        return target.open_runtime(bundle, manifest)
    except ExportError:
        raise
    except Exception as e:  # the runtimes raise RuntimeError, ValueError, their own types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BundleError(
            f"the runtime cannot load this bundle ({e.__class__.__name__}: {excerpt(first, 160)})",
            file=bundle,
            fix="re-export the bundle with autoglm-export",
        ) from None
