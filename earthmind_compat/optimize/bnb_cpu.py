"""A correct 4-bit matmul for layers whose rows are not a whole number of bitsandbytes blocks, on CPU.

bitsandbytes quantizes a 4-bit weight in blocks of ``blocksize`` (64) consecutive elements of the
*flattened* tensor, so a block may span two rows when ``in_features`` is not a multiple of 64. Its AVX-512
CPU dequantization kernel (bitsandbytes 0.50, CPUs with AVX-512) indexes the blocks row by row instead and
reads the wrong scale for such layers: a 64 x 32 nf4 weight comes back with a relative error of about 0.22
instead of 0.09 (measured on an AMD EPYC with AVX-512; CPUs without AVX-512 use a kernel that is right).
The real presets never hit this (every width is a multiple of 64), the tiny test presets do.

:func:`native_dequant_splits_rows` detects the problem once per process with a probe on a 64 x 32 tensor,
and :func:`repair_partial_block_layers` gives each affected ``Linear4bit`` a forward pass that dequantizes
over the flattened tensor in plain torch (the same arithmetic as bitsandbytes' portable kernel), so every
CPU computes the same, correct result. Where the native kernel is right nothing changes.
"""

from __future__ import annotations

import functools

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import torch
from torch import nn


def dequantize_4bit_flat(packed: torch.Tensor, quant_state: object) -> torch.Tensor:
    """Dequantize a bitsandbytes 4-bit weight, with blocks taken over the flattened tensor.

    Args:
        packed: The packed ``uint8`` storage (two 4-bit codes per byte, the first in the high nibble).
        quant_state: Its ``bitsandbytes.functional.QuantState`` (absmax, code, blocksize, shape, nesting).

    Returns:
        A float32 tensor of ``quant_state.shape``.
    """
    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = bnb_functional.dequantize_blockwise(absmax, quant_state.state2) + quant_state.offset
    absmax = absmax.float()
    codes = packed.view(torch.uint8).reshape(-1)
    indices = torch.stack((codes >> 4, codes & 0x0F), dim=1).reshape(-1).long()
    numel = torch.Size(quant_state.shape).numel()
    blocksize = quant_state.blocksize
    values = quant_state.code.to(packed.device, torch.float32)[indices[:numel]]
    padded = torch.nn.functional.pad(values, (0, absmax.numel() * blocksize - numel))
    scaled = padded.view(-1, blocksize) * absmax.to(packed.device)[:, None]
    return scaled.reshape(-1)[:numel].view(quant_state.shape)


@functools.cache
def native_dequant_splits_rows() -> bool:
    """Whether bitsandbytes' CPU dequantization reads the wrong scales for rows shorter than a block.

    Quantization works on the flattened tensor, so a 64 x 32 weight and the same values shaped 32 x 64 are
    stored identically; a correct dequantization gives the same values for both. Cached per process.
    """
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, generator=generator)
    narrow = bnb_functional.dequantize_4bit(*bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4"))
    wide = bnb_functional.dequantize_4bit(
        *bnb_functional.quantize_4bit(weight.reshape(32, 64), blocksize=64, quant_type="nf4")
    )
    return not torch.equal(narrow, wide.reshape(64, 32))


class FlatBlockLinear4bit(bnb.nn.Linear4bit):
    """A ``Linear4bit`` that dequantizes its weight with :func:`dequantize_4bit_flat` (same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` with ``W`` dequantized over the flattened tensor, in ``compute_dtype``."""
        dtype = self.compute_dtype or x.dtype
        weight = dequantize_4bit_flat(self.weight.data, self.weight.quant_state).to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), weight, bias).to(x.dtype)


def needs_flat_dequant(layer: nn.Module) -> bool:
    """Whether ``layer`` is a CPU ``Linear4bit`` whose rows split blocks, on a CPU with the faulty kernel."""
    if (
        not isinstance(layer, bnb.nn.Linear4bit)
        or isinstance(layer, FlatBlockLinear4bit)
        or layer.weight.device.type != "cpu"
    ):
        return False
    state = getattr(layer.weight, "quant_state", None)
    if state is None or layer.in_features % state.blocksize == 0:
        return False
    return native_dequant_splits_rows()


def repair_partial_block_layers(module: nn.Module) -> list[str]:
    """Route every affected 4-bit layer of ``module`` through :func:`dequantize_4bit_flat`.

    Args:
        module: Any module holding bitsandbytes ``Linear4bit`` layers (quantized in place or at load time).

    Returns:
        The paths of the layers that were repaired (empty where the native kernel is right).
    """
    return [path for path, layer in module.named_modules() if repair_layer(layer)]


def repair_layer(layer: nn.Module) -> bool:
    """Make ``layer`` a :class:`FlatBlockLinear4bit` if :func:`needs_flat_dequant`; return whether it did."""
    if not needs_flat_dequant(layer):
        return False
    layer.__class__ = FlatBlockLinear4bit  # adds no state: only the forward pass differs
    return True
