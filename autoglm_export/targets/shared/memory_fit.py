"""Refuse up front an export that cannot fit in this machine's memory, before any tensor is read:
an OOM kill minutes into an export says nothing and can freeze a laptop.

The model is a lower bound fitted to measurements at 9B widths (bench/scale, docs/benchmarks.md):
the exported graphs of the components lowered together are held until lowering (``held`` bytes
per parameter), and lowering one component grows RSS by ``per_component`` bytes per parameter. A
decoder lowered in parts is lowered one part at a time with nothing else held (first, or for qnn
after the other components' program is written and freed).
"""

from __future__ import annotations

import os
import re

from ...errors import BackendUnavailable


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def part_params(plan, parts: list[tuple[int, int]]) -> list[int]:
    """Parameters of each decoder part: a layer's weights go to the part holding that layer, the
    rest (final norm, lm_head) to the last part."""
    sizes = [0] * len(parts)
    for name, w in plan.weights.items():
        m = re.match(r"layers\.(\d+)\.", name)
        i = len(parts) - 1 if m is None else next(k for k, (a, b) in enumerate(parts) if a <= int(m.group(1)) < b)
        sizes[i] += w.params
    return sizes


def refuse_if_over_memory(
    target: str,
    plans: dict,
    *,
    held: float,
    per_component: float,
    how: str,
    parts: list[tuple[int, int]] | None = None,
    fix: str = "per-layer-group lowering is not implemented yet: docs/benchmarks.md",
) -> None:
    """``parts``: the decoder's layer ranges when it is lowered in parts, first and alone, each part
    freed before the next; the other components are then held together until lowered."""
    units = []  # (what is lowered, its parameters, parameters held beside it)
    in_parts = bool(parts) and "text_decoder" in plans
    rest = sum(p.summary()["params"] for n, p in plans.items() if not (in_parts and n == "text_decoder"))
    for name, plan in plans.items():
        if in_parts and name == "text_decoder":
            units += [(f"text_decoder layers {a}..{b - 1}", n, 0) for (a, b), n in zip(parts, part_params(plan, parts))]
        else:
            units.append((name, plan.summary()["params"], rest))
    have = physical_memory_bytes()
    for label, params, beside in units:
        need = held * beside + per_component * params
        if need > have:
            raise BackendUnavailable(
                f"{target} {how}: {label} ({params:,} parameters; {beside:,} held as exported programs meanwhile) needs at least "
                f"{need / 2**30:.0f} GiB, this machine has {have / 2**30:.0f} GiB; run on a larger machine ({fix})"
            )
