"""Refuse up front an export that cannot fit in this machine's memory, before any tensor is read:
an OOM kill minutes into an export says nothing and can freeze a laptop.

The model is a lower bound fitted to measurements at 9B widths (bench/scale, docs/benchmarks.md):
every component's exported graph is held until lowering (``held`` bytes per parameter of the
whole model), and lowering one component grows RSS by ``per_component`` bytes per parameter.
"""

from __future__ import annotations

import os

from ..errors import BackendUnavailable


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def refuse_if_over_memory(target: str, plans: dict, *, held: float, per_component: float, how: str) -> None:
    total = sum(p.summary()["params"] for p in plans.values())
    have = physical_memory_bytes()
    for plan in plans.values():
        params = plan.summary()["params"]
        need = held * total + per_component * params
        if need > have:
            raise BackendUnavailable(
                f"{target} {how}: {plan.component} ({params:,} parameters, {total:,} in the model) needs at least "
                f"{need / 2**30:.0f} GiB, this machine has {have / 2**30:.0f} GiB; run on a larger machine "
                "(per-layer-group lowering is not implemented yet: docs/benchmarks.md)")  # fmt: skip
