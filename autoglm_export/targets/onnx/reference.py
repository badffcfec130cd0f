"""The onnx target's "PyTorch with the same weights": the fp32 module with every MatMulNBits weight
replaced by what the bundle holds, read back from the written models (codes and scales only: the
rest of their external data, 3.6 GB of fp32 ViT at 9B widths, is not read).

A large weight stays as its int4 codes and is dequantized a block of output rows at a time on every
call (``MatMulNBitsLinear``): dequantized whole, the reference held the decoder in fp32, 0.87 GB per
9B layer (10.8 GiB at 4 layers, out of any budget at 40). Small weights, and references that are
exported again (``verify --against onnxruntime``), get the dequantized values as a plain weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ... import quantize
from ..shared.export_caches import return_freed_memory


@dataclass(frozen=True)
class NBitsWeight:
    """A MatMulNBits node's [N, K] weight as stored: codes [N, blocks, blob bytes], scales [N, blocks]
    (symmetric: the zero point is implicit)."""

    name: str
    bits: int
    k: int
    n: int
    packed: np.ndarray
    scales: np.ndarray

    @classmethod
    def of(cls, node, inits: dict) -> "NBitsWeight":
        import onnx

        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) > 3 and node.input[3]:
            raise ValueError(f"{node.name}: asymmetric MatMulNBits is not produced by this exporter")
        w = cls(node.name, attrs["bits"], attrs["K"], attrs["N"], inits[node.input[1]], inits[node.input[2]])
        if w.packed.shape[0] != w.n:
            raise ValueError(f"{node.name}: {w.packed.shape[0]} packed rows for N = {w.n}")
        return w

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows a..b of the weight in fp32."""
        p = self.packed[a:b]
        blocks = p.shape[1]
        q = np.stack([p & 0x0F, p >> 4], axis=-1).reshape(b - a, blocks, -1) if self.bits == 4 else p
        zero = 1 << (self.bits - 1)
        w = (q.astype(np.float32) - zero) * self.scales.reshape(self.n, blocks, 1)[a:b].astype(np.float32)
        return w.reshape(b - a, -1)[:, : self.k]

    def into(self, out: np.ndarray) -> np.ndarray:
        """The whole weight in fp32 written into ``out``, a block of rows at a time (whole, the 9B's
        lm_head took four fp32 temporaries of 2.5 GB each)."""
        if out.shape != (self.n, self.k):
            raise ValueError(
                f"{self.name}: weight of shape {list(out.shape)} for MatMulNBits N = {self.n}, K = {self.k}"
            )
        for a, b in quantize.row_blocks(self.n, self.k):
            out[a:b] = self.rows(a, b)
        return out


class MatMulNBitsLinear(nn.Module):
    """A linear holding a MatMulNBits weight's codes, dequantized a block of output rows at a time on
    every call: the same weights as ``NBitsWeight.into``, outputs equal to the linear on the
    whole dequantized weight up to the matmul's blocking."""

    def __init__(self, weight: NBitsWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.w = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize.linear_in_row_blocks(x, self._rows, self.w.n, self.w.k, self.bias)

    def _rows(self, a: int, b: int) -> torch.Tensor:
        return torch.from_numpy(self.w.rows(a, b))


class BundleWeights:
    """An ``on_module`` hook for ``load.load_component``: each quantized linear (``weights``: parameter
    name -> the bundle's weight), as soon as the checkpoint's weights are in it, takes the bundle's
    weight instead (``per_call``: large ones as ``MatMulNBitsLinear``, so no fp32 copy of them
    stays). ``finish()`` checks every one was used."""

    def __init__(self, root: nn.Module, weights: dict[str, NBitsWeight], per_call: bool = True) -> None:
        self.root, self.weights, self.per_call = root, dict(weights), per_call

    def __call__(self, owner_name: str, owner: nn.Module) -> None:
        w = self.weights.pop(f"{owner_name}.weight" if owner_name else "weight", None)
        if w is None:
            return
        param = owner.weight
        if (
            self.per_call
            and isinstance(owner, nn.Linear)
            and owner_name
            and param.numel() > quantize.REFERENCE_BLOCK_ELEMENTS
        ):
            parent, _, child = owner_name.rpartition(".")
            setattr(self.root.get_submodule(parent), child, MatMulNBitsLinear(w, owner.bias))
            return_freed_memory()  # the checkpoint's fp32 copy of the weight, just dropped
        else:
            with torch.no_grad():
                if param.dtype == torch.float32 and param.is_contiguous():
                    w.into(param.detach().numpy())  # in place: no copy
                else:
                    param.copy_(torch.from_numpy(w.into(np.empty((w.n, w.k), np.float32))).to(param.dtype))

    def finish(self) -> None:
        if self.weights:
            raise RuntimeError(f"quantized weights the reference module does not have: {sorted(self.weights)[:5]}")
