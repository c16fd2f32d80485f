"""The CPU 4-bit dequantization repair: right values on every CPU, applied only where the kernel is wrong."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch

from earthmind_compat.optimize import bnb_cpu
from earthmind_compat.optimize.quantize import quantize_linear, quantize_linears

pytestmark = [pytest.mark.numerics, pytest.mark.filterwarnings("ignore::UserWarning")]


def _row_split_dequant(packed, quant_state):
    """A deliberately wrong dequantization that restarts the blocks at every row (the faulty kernel)."""
    rows, cols = quant_state.shape
    codes = packed.view(torch.uint8).reshape(-1)
    values = quant_state.code[torch.stack((codes >> 4, codes & 0x0F), 1).reshape(-1).long()].view(rows, cols)
    absmax = quant_state.absmax.float()
    per_row = -(-cols // quant_state.blocksize)
    block = torch.arange(rows)[:, None] * per_row + torch.arange(cols)[None] // quant_state.blocksize
    return values * absmax[block.clamp_max(absmax.numel() - 1)]


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_flat_dequant_reads_each_block_with_its_own_scale(quant_type, double_quant):
    # Quantization works on the flattened tensor, so 96 x 40 and the same values as 60 x 64 are stored alike;
    # the native kernel is right for the second shape (whole blocks per row) on every CPU.
    weight = torch.randn(96, 40, generator=torch.Generator().manual_seed(1))
    narrow = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    wide = bnb_functional.quantize_4bit(
        weight.reshape(60, 64), blocksize=64, quant_type=quant_type, compress_statistics=double_quant
    )
    expected = bnb_functional.dequantize_4bit(*wide).reshape(96, 40)
    torch.testing.assert_close(bnb_cpu.dequantize_4bit_flat(*narrow), expected, rtol=0, atol=1e-6)
    assert not torch.equal(_row_split_dequant(*narrow), expected)  # the deliberate fault is visible


def test_probe_tells_a_row_splitting_kernel_from_a_correct_one(monkeypatch):
    probe = bnb_cpu.native_dequant_splits_rows.__wrapped__  # uncached
    monkeypatch.setattr(bnb_functional, "dequantize_4bit", _row_split_dequant)
    assert probe() is True
    monkeypatch.setattr(bnb_functional, "dequantize_4bit", bnb_cpu.dequantize_4bit_flat)
    assert probe() is False


def _quantized_mlp(monkeypatch, kernel_is_faulty: bool) -> torch.nn.Sequential:
    monkeypatch.setattr(bnb_cpu, "native_dequant_splits_rows", lambda: kernel_is_faulty)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    quantize_linears(model, "nf4")
    return model


@pytest.mark.parametrize("kernel_is_faulty", [True, False])
def test_only_layers_with_partial_rows_are_repaired_and_only_where_needed(monkeypatch, kernel_is_faulty):
    model = _quantized_mlp(monkeypatch, kernel_is_faulty)
    assert isinstance(model[0], bnb_cpu.FlatBlockLinear4bit) is kernel_is_faulty  # 32 columns: half a block
    assert type(model[2]) is bnb.nn.Linear4bit  # 64 columns: whole blocks, native kernel always used


def test_repair_keeps_the_state_dict(monkeypatch):
    repaired, native = _quantized_mlp(monkeypatch, True), _quantized_mlp(monkeypatch, False)
    assert isinstance(repaired[0], bnb_cpu.FlatBlockLinear4bit)
    repaired_state, native_state = repaired.state_dict(), native.state_dict()
    assert repaired_state.keys() == native_state.keys()
    for key, tensor in native_state.items():
        assert torch.equal(repaired_state[key], tensor), key


def test_repaired_layer_computes_the_flat_dequantized_matmul_and_trains(monkeypatch):
    monkeypatch.setattr(bnb_cpu, "native_dequant_splits_rows", lambda: True)
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 64)
    layer = quantize_linear(linear, "nf4", double_quant=True)
    assert isinstance(layer, bnb_cpu.FlatBlockLinear4bit)
    weight = bnb_cpu.dequantize_4bit_flat(layer.weight.data, layer.weight.quant_state)
    assert 0 < ((weight - linear.weight).norm() / linear.weight.norm()).item() < 0.15  # nf4-sized error
    x = torch.randn(2, 5, 40, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, linear.bias))
    out.square().mean().backward()
    assert x.grad is not None and layer.bias.grad is not None and layer.weight.grad is None
    with torch.no_grad():  # eval without gradients takes the same path (no CPU repacking)
        torch.testing.assert_close(layer.eval()(x), out)
