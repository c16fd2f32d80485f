"""Pure logic of the planner's byte counts (earthmind_compat.optimize.plan): quantized_weight_bytes, count_weights.

Expected bytes are worked out by hand from the storage bitsandbytes keeps (tests/test_plan.py checks the same
counts against really quantized models):

- int8: one byte per weight plus one float32 scale per output row;
- 4-bit: two weights per byte, a 16-entry float32 code table, one float32 absmax per block of 64 weights;
- 4-bit with double quantization: the absmax become one byte each, plus one float32 absmax per 256 blocks,
  a 256-entry float32 code table and a float32 offset.

count_weights runs on a small module of known parameters; which layers take LoRA is fixed by replacing
``lora_targets`` (the real family lookup needs a registered backbone).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import earthmind_compat.optimize.plan as plan_module
from earthmind_compat.errors import ConfigurationError, UnknownNameError
from earthmind_compat.optimize.cuda_memory import check_device, cublas_workspace_bytes, cuda_terms
from earthmind_compat.optimize.plan import (
    ActivationTrace,
    BlockGrowth,
    Skeleton,
    count_trainable_tensors,
    count_weights,
    quantized_weight_bytes,
)
from earthmind_compat.optimize.sharding import DeviceStates, device_states, local_numel
from earthmind_compat.optimize.techniques import parse_technique

pytestmark = pytest.mark.numerics


@pytest.mark.parametrize(
    ("shape", "quantization", "double_quant", "expected"),
    [
        ((16, 32), "int8", False, 512 + 4 * 16),
        ((3, 5), "int8", False, 15 + 12),
        ((3, 5), "int8", True, 15 + 12),  # double quantization is a 4-bit notion
        ((16, 32), "nf4", False, 256 + 64 + 4 * 8),
        ((16, 32), "fp4", False, 256 + 64 + 4 * 8),
        ((16, 32), "nf4", True, 256 + 64 + 8 + 4 * 1 + 1024 + 4),
        ((3, 5), "nf4", False, 8 + 64 + 4),  # 15 weights: 8 bytes of codes, one block
        ((3, 5), "fp4", True, 8 + 64 + 1 + 4 + 1024 + 4),
        ((1, 64), "nf4", False, 32 + 64 + 4),
        ((1, 65), "nf4", False, 33 + 64 + 8),  # one weight more: a second block
        ((256, 257), "nf4", False, 32896 + 64 + 4 * 1028),
        ((256, 257), "nf4", True, 32896 + 64 + 1028 + 4 * 5 + 1024 + 4),  # 1028 blocks: 5 nested blocks of 256
        ((64, 1024), "nf4", True, 32768 + 64 + 1024 + 4 * 4 + 1024 + 4),  # 1024 blocks: exactly 4 nested blocks
    ],
)
def test_quantized_weight_bytes(shape: tuple[int, int], quantization: str, double_quant: bool, expected: int) -> None:
    assert quantized_weight_bytes(*shape, quantization, double_quant) == expected


class _Experts(nn.Module):
    """A fused expert stack as transformers 5.x lays it out: 3-D gate_up_proj / down_proj and an act_fn."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(2, 8, 4))  # 2 experts of [8, 4]: 64 parameters
        self.down_proj = nn.Parameter(torch.zeros(2, 4, 4))  # 2 experts of [4, 4]: 32 parameters
        self.act_fn = nn.ReLU()


class _Toy(nn.Module):
    """181 parameters: 173 float32 and 8 bfloat16 (the norm)."""

    def __init__(self, new_modules: bool = True) -> None:
        super().__init__()
        block = nn.Module()
        block.q = nn.Linear(4, 6)  # weight [6, 4] = 24, bias 6
        block.v = nn.Linear(6, 4, bias=False)  # weight [4, 6] = 24
        block.norm = nn.LayerNorm(4, dtype=torch.bfloat16)  # 8 parameters of 2 bytes
        self.blocks = nn.ModuleList([block])
        moe = nn.Module()
        moe.experts = nn.ModuleList([nn.Module()])
        moe.experts[0].q = nn.Linear(4, 2, bias=False)  # weight [2, 4] = 8; named q, but an expert: no LoRA
        self.moe = moe
        self.fused = _Experts()  # 96
        self.head = nn.Linear(4, 3)  # weight [3, 4] = 12, bias 3
        if new_modules:
            self.new_modules = ("head",)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> _Toy:
    monkeypatch.setattr(plan_module, "lora_targets", lambda backbone: ("q", "v"))
    return _Toy()


FP32_BYTES = (181 - 8) * 4 + 8 * 2  # 708
LORA_R2 = 2 * (4 + 6) + 2 * (6 + 4)  # blocks.0.q and blocks.0.v only: 40
# int8 bytes of every nn.Linear weight ([6,4], [4,6], [2,4], [3,4]) and of each expert matrix
INT8_LINEAR = (24 + 4 * 6) + (24 + 4 * 4) + (8 + 4 * 2) + (12 + 4 * 3)  # 128
INT8_EXPERTS = 2 * (32 + 4 * 8) + 2 * (16 + 4 * 4)  # 192
NF4_LINEAR = (12 + 64 + 4) + (12 + 64 + 4) + (4 + 64 + 4) + (6 + 64 + 4)  # 306
NF4_EXPERTS = 2 * (16 + 64 + 4) + 2 * (8 + 64 + 4)  # 320
DQ = 1 + 4 + 1024 + 4  # per matrix of one block, on top of codes and code table
NF4_DQ_LINEAR = (12 + 64 + DQ) + (12 + 64 + DQ) + (4 + 64 + DQ) + (6 + 64 + DQ)
NF4_DQ_EXPERTS = 2 * (16 + 64 + DQ) + 2 * (8 + 64 + DQ)
UNQUANTIZED_REST = (6 + 3) * 4 + 8 * 2  # biases of q and head, and the bfloat16 norm: 52 bytes, 17 parameters
QUANTIZED_PARAMETERS = 24 + 24 + 8 + 12 + 64 + 32  # 164


@pytest.mark.parametrize(
    ("technique", "lora_r", "expected"),
    [
        ("none", 8, {"weights": FP32_BYTES, "parameters": 181, "trainable": 181}),
        ("ckpt", 8, {"weights": FP32_BYTES, "parameters": 181, "trainable": 181}),
        # LoRA: adapters in float32; everything frozen except the adapters and the new head (12 + 3)
        ("lora", 2, {"weights": FP32_BYTES + 4 * LORA_R2, "parameters": 181 + LORA_R2, "trainable": 15 + LORA_R2}),
        ("lora", 8, {"weights": FP32_BYTES + 4 * 160, "parameters": 181 + 160, "trainable": 15 + 160}),
        (
            "int8",
            8,
            {
                "weights": INT8_LINEAR + INT8_EXPERTS + UNQUANTIZED_REST,
                "parameters": 181,
                "trainable": 181 - QUANTIZED_PARAMETERS,
            },
        ),
        (
            "nf4+lora",
            2,
            {
                "weights": NF4_LINEAR + NF4_EXPERTS + UNQUANTIZED_REST + 4 * LORA_R2,
                "parameters": 181 + LORA_R2,
                "trainable": 15 + LORA_R2,
            },
        ),
        (
            "fp4",
            2,
            {
                "weights": NF4_LINEAR + NF4_EXPERTS + UNQUANTIZED_REST,
                "parameters": 181,
                "trainable": 181 - QUANTIZED_PARAMETERS,
            },
        ),
        (
            "nf4+dq",
            8,
            {
                "weights": NF4_DQ_LINEAR + NF4_DQ_EXPERTS + UNQUANTIZED_REST,
                "parameters": 181,
                "trainable": 181 - QUANTIZED_PARAMETERS,
            },
        ),
    ],
)
def test_count_weights(toy: _Toy, technique: str, lora_r: int, expected: dict[str, int]) -> None:
    assert count_weights(toy, parse_technique(technique), lora_r=lora_r) == expected


def test_count_weights_default_rank_is_8(toy: _Toy) -> None:
    assert count_weights(toy, parse_technique("lora"))["parameters"] == 181 + 8 * (10 + 10)


def test_lora_without_new_modules_trains_only_the_adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "lora_targets", lambda backbone: ("q", "v"))
    counted = count_weights(_Toy(new_modules=False), parse_technique("lora"), lora_r=2)
    assert counted == {"weights": FP32_BYTES + 4 * LORA_R2, "parameters": 181 + LORA_R2, "trainable": LORA_R2}


def test_a_shared_parameter_is_counted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "lora_targets", lambda backbone: ())
    model = nn.Module()
    model.a = nn.Linear(4, 4, bias=False)
    model.b = nn.Linear(4, 4, bias=False)
    model.b.weight = model.a.weight
    assert count_weights(model, parse_technique("none")) == {"weights": 64, "parameters": 16, "trainable": 16}


def test_local_numel_fsdp_splits_rows_zero3_splits_elements() -> None:
    weight = nn.Parameter(torch.zeros(5, 3))  # 15 elements in 5 rows
    assert local_numel(weight, 2, "fsdp") == 3 * 3  # ceil(5 / 2) rows of 3
    assert local_numel(weight, 2, "deepspeed_stage_3") == 8  # ceil(15 / 2)
    assert local_numel(nn.Parameter(torch.zeros(1, 7)), 4, "fsdp") == 7  # one row: whole on every device
    assert local_numel(nn.Parameter(torch.zeros(1, 7)), 4, "deepspeed_stage_3") == 2


def _plain_toy() -> nn.Module:
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Linear(4, 6), nn.Linear(6, 4, bias=False)])  # 30 and 24 parameters
    model.stem = nn.Linear(2, 4)  # 12 parameters: the root unit
    return model


@pytest.mark.parametrize(
    ("strategy", "devices", "expected"),
    [
        ("single", 1, DeviceStates(264, 264, 528, 0)),
        ("ddp", 1, DeviceStates(264, 264, 528, 0)),
        ("ddp", 2, DeviceStates(264, 264, 528, 264)),  # gradient buckets: a second copy of the gradients
        # rows: [6,4] -> 3 x 4, bias [6] -> 3, [4,6] -> 2 x 6, stem [4,2] -> 2 x 2, bias [4] -> 2: 33 elements;
        # workspace: the root unit (12) + two of the largest block (30) + its gradient (30)
        ("fsdp", 2, DeviceStates(4 * 33, 4 * 33, 8 * 33, 4 * (12 + 3 * 30))),
        # ceil(numel / 3) per parameter: 24 -> 8, 6 -> 2, 24 -> 8, 8 -> 3, 4 -> 2: 23 elements
        ("deepspeed_stage_3", 3, DeviceStates(4 * 23, 4 * 23, 8 * 23, 4 * (12 + 3 * 30))),
    ],
)
def test_device_states(strategy: str, devices: int, expected: DeviceStates) -> None:
    model = _plain_toy()
    states = device_states(model, parse_technique("none"), strategy, devices, 4 * 66, 66, 8)
    assert states == expected


def test_device_states_refuses_bad_combinations() -> None:
    model = _plain_toy()
    with pytest.raises(ConfigurationError, match="1 device"):
        device_states(model, parse_technique("none"), "single", 2, 264, 66, 8)
    with pytest.raises(ConfigurationError, match="ddp"):
        device_states(model, parse_technique("nf4"), "fsdp", 2, 264, 66, 8)
    with pytest.raises(UnknownNameError, match="fsdp"):
        device_states(model, parse_technique("none"), "fsdq", 2, 264, 66, 8)


@pytest.mark.parametrize(
    ("major", "config", "expected"),
    [
        (8, "", 4096 * 1024 * 2 + 16 * 1024 * 8),  # ATen's ":4096:2:16:8" before Hopper
        (7, "", 8_519_680),
        (9, "", 32 * 2**20),
        (10, "", 32 * 2**20),
        (12, "", 32 * 2**20),
        (None, "", 32 * 2**20),  # unknown GPU: the larger default, not below
        (8, ":4096:8", 32 * 2**20),
        (9, ":16:8", 128 * 1024),
        (8, ":4096:2:16:8", 8_519_680),
    ],
)
def test_cublas_workspace_follows_aten(major, config, expected):
    assert cublas_workspace_bytes(major, config) == expected


def test_cublas_workspace_config_without_pairs_is_refused():
    with pytest.raises(ConfigurationError, match="':SIZE_KiB:COUNT'"):
        cublas_workspace_bytes(8, "4096")


def test_cuda_terms_add_context_workspaces_and_reserve():
    terms = cuda_terms(1000 * 2**20, capability_major=8)
    assert terms.context == 512 * 2**20
    assert terms.cublas_workspace == 2 * 8_519_680
    assert terms.allocator_reserve == 20 * 2**20 + int(0.10 * (1000 * 2**20 + 2 * 8_519_680))
    assert terms.total == terms.context + terms.cublas_workspace + terms.allocator_reserve


@pytest.mark.parametrize("value", ["gpu", "CUDA", True, None])
def test_planner_device_is_checked(value):
    with pytest.raises(ConfigurationError, match="device must be one of"):
        check_device(value)


@pytest.mark.parametrize(
    ("technique", "targets", "expected"),
    [
        ("none", None, 10),  # q.weight, q.bias, v.weight, norm (2), the expert's q, the fused stack (2), head (2)
        ("ckpt", None, 10),
        ("int8", None, 4),  # the 4 linear weights and the 2 fused stacks are quantized: biases and norm remain
        ("nf4", None, 4),
        ("lora", None, 6),  # adapters of blocks.0.q and blocks.0.v (A and B each), the new head's 2
        ("nf4+lora", None, 6),
        ("lora", ("v",), 4),  # the targets given replace the backbone's
    ],
)
def test_count_trainable_tensors(toy: _Toy, technique: str, targets: tuple[str, ...] | None, expected: int) -> None:
    assert count_trainable_tensors(toy, parse_technique(technique), targets) == expected


def test_trainable_tensors_without_new_modules_are_the_adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "lora_targets", lambda backbone: ("q", "v"))
    assert count_trainable_tensors(_Toy(new_modules=False), parse_technique("lora")) == 4


def test_count_weights_lora_targets_given_replace_the_backbones(toy: _Toy) -> None:
    counted = count_weights(toy, parse_technique("lora"), lora_r=2, lora_target_modules=("v",))
    assert counted["parameters"] == 181 + 2 * (6 + 4) and counted["trainable"] == 15 + 2 * (6 + 4)


def test_cublas_workspace_reads_the_environment_when_no_config_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    assert cublas_workspace_bytes(8) == 32 * 2**20
    assert cublas_workspace_bytes(8, "") == 8_519_680  # an explicit empty config is ATen's default
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    assert cublas_workspace_bytes(8) == 8_519_680


def _trace(returned: tuple[bool, bool]) -> ActivationTrace:
    """Two blocks of 1-sequence inputs [1, 2, 8] (64 bytes of output per image): the lower one with the large
    backward workspace, the upper one with the large kept memory (Granite's Mamba block under its attention block
    in transformers 4.x). Per image: block 0 keeps 100, needs 1000 in its backward; block 1 keeps 500, needs 50."""
    low = BlockGrowth(kept=(0.0, 100.0), workspace=(0.0, 1000.0), forward=(0.0, 10.0))
    high = BlockGrowth(kept=(0.0, 500.0), workspace=(0.0, 50.0), forward=(0.0, 10.0))
    shape = (torch.Size([1, 2, 8]), (0, 1, 2))
    skeleton = Skeleton(
        kept=(0.0, 0.0), gradients=(0.0, 8.0), backward=(0.0, 0.0), inputs=(shape, shape), features=returned
    )
    return ActivationTrace(skeleton, ((low, 1), (high, 1)))


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        # block 0's backward: the features' gradients 8, its own 100 + 1000, block 1's returned output 64
        # (the rest of block 1's 500 was freed by block 1's backward, which ran first)
        ((True, True), 8 + 100 + 1000 + 64),
        ((False, False), 8 + 100 + 1000),
    ],
)
def test_a_block_backward_counts_only_the_returned_outputs_of_the_blocks_above(returned, expected) -> None:
    trace = _trace(returned)
    assert trace.at(1) == expected
    assert trace.at(3) == 3 * expected  # everything here grows with the batch


def test_what_a_block_above_retains_past_its_backward_is_counted() -> None:
    """Tensors bitsandbytes keeps on its autograd context live until the whole backward ends."""
    trace = _trace((True, True))
    held = BlockGrowth(kept=(0.0, 500.0), workspace=(0.0, 50.0), forward=(0.0, 10.0), retained=(0.0, 30.0))
    trace = ActivationTrace(trace.skeleton, (trace.blocks[0], (held, 1)))
    assert trace.at(1) == 8 + 100 + 1000 + 64 + 30


def test_the_upper_block_backward_counts_every_block_below() -> None:
    """When the upper block's backward is the largest moment, it sees every block's kept bytes."""
    low = BlockGrowth(kept=(0.0, 100.0), workspace=(0.0, 50.0))
    high = BlockGrowth(kept=(0.0, 500.0), workspace=(0.0, 1000.0))
    shape = (torch.Size([1, 2, 8]), (0, 1, 2))
    skeleton = Skeleton((0.0, 0.0), (0.0, 8.0), (0.0, 0.0), (shape, shape), (True, True))
    assert ActivationTrace(skeleton, ((low, 1), (high, 1))).at(1) == 8 + 100 + 500 + 1000
