"""Quantization stage: resolve recipe rules per weight, then apply them while weights stream in.

The plan is made on the meta-device modules (names and shapes only) so that every rule error
surfaces before a tensor is read. Applying a plan is a hook for ``load.load_component``: each
linear / embedding is quantized the moment its weights are loaded, so a component never sits in
memory in fp32 as a whole. The torchao configuration for a scheme comes from the target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import RecipeError
from .recipe import INT4_GROUP_SIZES, Recipe, RuleTimeout
from .targets.shared.export_caches import return_freed_memory
from .targets.table import TARGETS

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# what a phone stores per weight: packed integers plus one 16-bit scale per group / channel
SCALE_BITS = 16


@dataclass(frozen=True)
class WeightPlan:
    weight: str  # "<component>.<name>"
    scheme: str  # int4 | int8 | fp16 | fp32
    group_size: int | str | None  # int4: block size, or "channel" (one scale per output row; coreml)
    rule: int | None  # index of the matching rule, None when no rule matched
    params: int
    shape: tuple[int, ...]
    rule_group: int | None = (
        None  # the rule's group size when it does not divide this weight (group_size is then the fallback)
    )

    @property
    def bits(self) -> float:
        if self.scheme == "int4":
            return 4 + SCALE_BITS / (self.shape[-1] if self.group_size == "channel" else self.group_size)
        if self.scheme == "int8":
            return 8 + SCALE_BITS / self.shape[-1]
        return 16.0 if self.scheme == "fp16" else 32.0


@dataclass
class ComponentPlan:
    component: str
    dtype: str  # float precision of everything not quantized
    weights: dict[str, WeightPlan] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return any(w.scheme in ("int4", "int8") for w in self.weights.values())

    @property
    def weight_bytes(self) -> float:
        """What the plan's weights take at their schemes' bits (scales included)."""
        return sum(w.bits * w.params for w in self.weights.values()) / 8

    def decoder_part(self, layers: tuple[int, int], num_layers: int) -> "ComponentPlan":
        """The weights of decoder layers [a, b), and the final norm and lm_head when b is the last."""
        a, b = layers

        def mine(name: str) -> bool:
            m = re.match(r"layers\.(\d+)\.", name)
            return a <= int(m.group(1)) < b if m else b == num_layers

        return ComponentPlan(self.component, self.dtype, {n: w for n, w in self.weights.items() if mine(n)})

    def summary(self) -> dict:
        schemes: dict[str, int] = {}
        bits = params = 0.0
        for w in self.weights.values():
            key = (
                ("int4-channel" if w.group_size == "channel" else f"int4-g{w.group_size}")
                if w.scheme == "int4"
                else w.scheme
            )
            schemes[key] = schemes.get(key, 0) + w.params
            bits += w.bits * w.params
            params += w.params
        out = {
            "float_dtype": self.dtype,
            "params": int(params),
            "params_by_scheme": dict(sorted(schemes.items())),
            "effective_bits_per_weight": round(bits / params, 4) if params else 0.0,
        }
        fallbacks = self.group_fallbacks()
        if fallbacks:
            out["int4_group_fallbacks"] = fallbacks
        return out

    def group_fallbacks(self) -> dict[str, dict]:
        """Weights whose rule's int4 group size does not divide their input width, and what they got."""
        return {
            w.weight: {
                "rule_group_size": w.rule_group,
                "scheme": w.scheme,
                "group_size": w.group_size,
                "in_features": w.shape[-1],
            }
            for w in self.weights.values()
            if w.rule_group is not None
        }


def _quantizable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding))


def fitting_group(group: int, width: int) -> int | str:
    """The largest allowed int4 group no larger than ``group`` that divides ``width``, else one scale
    per output channel: every valid checkpoint exports with every recipe (a GLM-4.1V MLP of width 200
    has no group of 32)."""
    return next((g for g in sorted(INT4_GROUP_SIZES, reverse=True) if g <= group and width % g == 0), "channel")


def plan_component(recipe: Recipe, component: str, module: nn.Module, recipe_file: str) -> ComponentPlan:
    """Decide a scheme for every parameter of ``module`` (built on meta) from the recipe rules."""
    caps = TARGETS[recipe.target]
    float_votes: dict[str, str] = {}
    weights: dict[str, WeightPlan] = {}
    owners = dict(module.named_modules())
    for name, p in module.named_parameters():
        full = f"{component}.{name}"
        owner = owners[name.rpartition(".")[0]]
        try:
            rule_idx, rule = recipe.match(full)
        except RuleTimeout as e:
            raise RecipeError(recipe_file, [str(e)]) from None
        scheme = rule.scheme if rule else "fp32"
        group = rule.group_size if rule else None
        if scheme == "int4" and caps.per_channel_int4:
            group = "channel"  # what their quantizers do: planned bytes and bits follow the artifact, not the rule
        if scheme in ("int4", "int8") and not (_quantizable(owner) and name.endswith(".weight")):
            scheme, group = None, None  # biases, norms: keep the component's float precision
        if scheme in FLOAT_DTYPES and rule is not None:
            float_votes.setdefault(scheme, full)
        rule_group = None
        if scheme == "int4" and group != "channel" and p.shape[-1] % group:
            rule_group, group = group, fitting_group(group, p.shape[-1])
            if group == "channel" and caps.int4_groups_only:
                scheme, group = "int8", None
        weights[name] = WeightPlan(full, scheme or "?", group, rule_idx, p.numel(), tuple(p.shape), rule_group)
    if len(float_votes) > 1:
        got = ", ".join(f"{s} for {w}" for s, w in float_votes.items())
        raise RecipeError(
            recipe_file,
            [
                f"quantization (component {component}): one component cannot mix fp16 and fp32 "
                f"weights, got {got}; give every float weight of a component the same precision"
            ],
        )
    dtype = next(iter(float_votes), "fp32")
    for name, w in weights.items():
        if w.scheme in ("?",) or (w.scheme in FLOAT_DTYPES and w.scheme != dtype):
            weights[name] = WeightPlan(w.weight, dtype, None, w.rule, w.params, w.shape)
    return ComponentPlan(component, dtype, weights)


def unused_rules(recipe: Recipe, plans: dict[str, ComponentPlan]) -> list[int]:
    """Rules that no weight of this checkpoint reached (a typo leaves a component in fp32 unnoticed)."""
    used = {w.rule for plan in plans.values() for w in plan.weights.values()}
    return [i for i in range(len(recipe.quantization)) if i not in used]


TorchaoConfigFor = Callable[[str, int | None, nn.Module], object]


def quantize_hook(plan: ComponentPlan, config_for: TorchaoConfigFor) -> Callable[[str, nn.Module], None]:
    """An ``on_module`` hook that swaps a freshly loaded linear/embedding for its quantized form."""
    from torchao.quantization import quantize_

    def hook(owner_name: str, owner: nn.Module) -> None:
        if not _quantizable(owner):
            return
        w = plan.weights.get(f"{owner_name}.weight" if owner_name else "weight")
        if w is None or w.scheme not in ("int4", "int8"):
            return
        before = type(owner.weight)
        config = config_for(w.scheme, w.group_size, owner)
        if owner.weight.numel() > BLOCK_ELEMENTS and owner.weight.shape[0] > 1:
            _quantize_in_row_blocks(owner, config)
        else:
            # quantize_'s default filter only takes nn.Linear; the plan already chose this module
            quantize_(owner, config, filter_fn=lambda m, fqn: True)
        if type(owner.weight) is before:
            raise RuntimeError(f"{w.weight}: planned {w.scheme} but torchao left it unquantized")
        # the fp32 temporaries just freed sit in glibc's arenas between the weights kept; without a
        # trim per weight the CI guard export peaked anywhere from 972 to 1110 MiB run to run
        return_freed_memory()

    return hook


# References run in PyTorch (verification) with torchao's quantized tensors, which dequantize the
# whole weight on every call through three fp32 temporaries of its size: for the 9B's 151552 x 4096
# token embedding and lm_head ~5 GB at once per decoded token, and minutes of page faults in
# verification's greedy runs. These forms dequantize only what a call needs, block by block.
REFERENCE_BLOCK_ELEMENTS = 1 << 22  # 16 MB of fp32: small enough for glibc to reuse between blocks


def _dequantized_rows(w: torch.Tensor, rows) -> torch.Tensor:
    from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, dequantize_affine

    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[w.target_dtype]
    return dequantize_affine(
        w.qdata[rows], w.block_size, w.scale[rows], w.zero_point[rows], torch.int8, qmin, qmax, output_dtype=w.dtype
    )


class RowLookupEmbedding(nn.Module):
    """A row-wise quantized embedding that dequantizes only the rows it looks up: the same values as
    torchao's lookup, since quantization groups never span rows."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = _dequantized_rows(self.weight, input_ids.reshape(-1))
        return rows.reshape(*input_ids.shape, rows.shape[-1])


class RowBlockLinear(nn.Module):
    """A row-wise quantized linear computed in blocks of output rows, each block's weights
    dequantized on its own (activations quantized once, as torchao does). The same arithmetic per
    output as torchao's linear up to the matmul's blocking (not bit-identical in general)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
            _apply_int8_act_asym_per_token_quant_dequant,
        )

        w = self.weight
        if w.activation_quantization is not None:
            x = _apply_int8_act_asym_per_token_quant_dequant(x)
        n, d = w.qdata.shape
        return linear_in_row_blocks(x, lambda a, b: _dequantized_rows(w, slice(a, b)), n, d, self.bias)


def row_blocks(n: int, k: int):
    """(a, b) ranges of rows of an [n, k] weight, about ``REFERENCE_BLOCK_ELEMENTS`` each."""
    step = max(1, REFERENCE_BLOCK_ELEMENTS // max(1, k))
    for a in range(0, n, step):
        yield a, min(a + step, n)


def linear_in_row_blocks(x: torch.Tensor, rows_of, n: int, k: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` on an [n, k] weight that exists only a block of output rows at a time
    (``rows_of(a, b)``: rows a..b in fp32)."""
    outs = [F.linear(x, rows_of(a, b), None if bias is None else bias[a:b]) for a, b in row_blocks(n, k)]
    return torch.cat(outs, dim=-1)


def _row_wise_quantized(w) -> bool:
    return (
        all(hasattr(w, a) for a in ("qdata", "scale", "zero_point", "block_size", "target_dtype"))
        and w.block_size[0] == 1
        and w.scale.shape[0] == w.qdata.shape[0]
    )


def dequantize_per_call(module: nn.Module) -> nn.Module:
    """``module`` (a PyTorch reference, never exported) with each row-wise quantized embedding
    looking up rows only and each such linear larger than a block computed in row blocks."""
    for name, child in list(module.named_modules()):
        w = getattr(child, "weight", None)
        if not _row_wise_quantized(w):
            continue
        if isinstance(child, nn.Embedding):
            form = RowLookupEmbedding(w)
        elif (
            isinstance(child, nn.Linear)
            and w.qdata.numel() > REFERENCE_BLOCK_ELEMENTS
            and hasattr(w, "activation_quantization")
        ):
            form = RowBlockLinear(child)
        else:
            continue
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, attr, form)
    return module


# torchao quantizes a weight through several fp32 temporaries of its full size: for the 9B's
# 151552 x 4096 token embedding and lm_head that took the process from 2.7 to 9.9 GiB. Groups
# never span rows (block size (1, group) or one scale per row), so quantizing row blocks and
# concatenating gives the same tensors with temporaries bounded by one block.
BLOCK_ELEMENTS = 1 << 25  # 32 M weights: 128 MB in fp32


def _quantize_in_row_blocks(owner: nn.Module, config) -> None:
    from torchao.quantization import quantize_

    weight = owner.weight.detach()
    rows = max(1, BLOCK_ELEMENTS // weight.shape[1])
    pieces = []
    for a in range(0, weight.shape[0], rows):
        part = weight[a : a + rows]
        # the same kind of module (the config may depend on it), weights assigned, none allocated
        block = (
            nn.Embedding(part.shape[0], part.shape[1], device="meta")
            if isinstance(owner, nn.Embedding)
            else nn.Linear(part.shape[1], part.shape[0], bias=False, device="meta")
        )
        block.weight = nn.Parameter(part, requires_grad=False)
        quantize_(block, config, filter_fn=lambda m, fqn: True)
        pieces.append(block.weight)
    first = pieces[0]
    if any(getattr(first, n, None) is None for n in ("tensor_data_names", "tensor_attribute_names")):
        raise RuntimeError(f"{type(first).__name__}: cannot join row blocks of this torchao tensor type")
    data = [torch.cat([getattr(p, n) for p in pieces]) for n in first.tensor_data_names]
    attrs = [getattr(first, n) for n in first.tensor_attribute_names]
    del pieces, weight
    owner.weight = nn.Parameter(type(first)(*data, *attrs), requires_grad=False)
