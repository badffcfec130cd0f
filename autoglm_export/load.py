"""Fill a meta-device component from the checkpoint, one tensor at a time.

Each weight is read (mmap), cast, transformed if its layout differs, and assigned; when every
parameter of a leaf module is in place, ``on_module`` may replace the module's float weights
(e.g. by their INT4 form) before the next tensor is read. Peak memory is therefore the
component in its final precision plus one float tensor, never the whole model in fp32.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
import torch.nn as nn

from .checkpoint import Checkpoint

OnModule = Callable[[str, nn.Module], None]


def _assign(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if isinstance(getattr(owner, attr, None), nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=False))
    else:
        owner.register_buffer(attr, value)


def load_shared(module: nn.Module, donor: nn.Module, ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Materialise ``module`` (built on meta) with ``donor``'s weights themselves, not copies, for
    components that differ only in shape-dependent tensors (the image buckets): the weights it
    takes from the checkpoint unchanged are ``donor``'s; those it derives (a position table
    interpolated to its grid) are read and derived again, in ``dtype``."""
    held = dict(donor.named_parameters()) | dict(donor.named_buffers())
    with torch.no_grad():
        for name, (key, transform) in module.weight_map().items():
            if transform is not None:
                t = transform(ckpt.tensor(key, torch.float32))
                _assign(module, name, t.to(dtype).contiguous())
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if isinstance(held[name], nn.Parameter):
                setattr(owner, attr, held[name])
            else:
                owner.register_buffer(attr, held[name])
        module.init_runtime_buffers()
    return module.eval()


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return factory()


def load_component(
    module: nn.Module,
    ckpt: Checkpoint,
    dtype: torch.dtype = torch.float32,
    on_module: OnModule | None = None,
) -> nn.Module:
    """Materialise ``module`` (built on meta) from ``ckpt`` using its ``weight_map()``."""
    wmap: dict[str, tuple[str, object]] = module.weight_map()
    pending: dict[str, set[str]] = defaultdict(set)
    for name in wmap:
        pending[name.rpartition(".")[0]].add(name)
    with torch.no_grad():
        for name, (key, transform) in wmap.items():
            t = ckpt.tensor(key, torch.float32)
            if transform is not None:
                t = transform(t)
            _assign(module, name, t.to(dtype).contiguous())
            del t
            owner = name.rpartition(".")[0]
            pending[owner].discard(name)
            if not pending[owner] and on_module is not None:
                on_module(owner, module.get_submodule(owner) if owner else module)
        module.init_runtime_buffers()
    leftovers = [
        n for n, p in list(module.named_parameters()) + list(module.named_buffers()) if p.device.type == "meta"
    ]
    if leftovers:
        raise RuntimeError(f"{type(module).__name__}: not loaded from the checkpoint: {leftovers[:5]}")
    return module.eval()
