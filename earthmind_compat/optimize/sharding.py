"""Per-device model states of the training strategies: one process, DDP, FSDP and DeepSpeed ZeRO-3.

Counted from the backbone built on the meta device, as the planner counts weights:

- ``single`` and ``ddp`` keep a full replica on every device; DDP adds its gradient buckets (a second copy of
  the gradients that all-reduce reads; ``gradient_as_bucket_view`` is off in Lightning's default).
- ``fsdp`` (full shard, each block its own unit) is counted as FSDP2 (``torch.distributed.fsdp.fully_shard``)
  allocates it: every parameter is split along dim 0 into N chunks, each device holding ``ceil(rows / N)``
  rows (padded). Lightning's ``FSDPStrategy`` (FSDP1, flat parameters) differs only by its padding: at most
  N - 1 elements per unit plus a 16-byte alignment per parameter. Gradients and optimizer state are sharded the
  same way for trainable parameters. The gathered-layer workspace is the root unit (the stem: gathered for the
  whole step), two blocks' unsharded parameters (the one running and the one prefetched) and one block's
  unsharded gradient before its reduce-scatter.
- ``deepspeed_stage_3`` partitions every parameter into ``ceil(numel / N)`` elements per device, with the same
  workspace as FSDP (the default prefetch gathers the next layer while one runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from earthmind_compat.errors import ConfigurationError, unknown_name
from earthmind_compat.optimize.distributed import STRATEGIES
from earthmind_compat.optimize.families import find_blocks
from earthmind_compat.optimize.techniques import Techniques

#: Strategies the planner knows: one process, then those of :mod:`earthmind_compat.optimize.distributed`.
PLAN_STRATEGIES = ("single", *STRATEGIES)


@dataclass
class DeviceStates:
    """Bytes of model states on one device.

    Attributes:
        weights: Parameters held (a shard with FSDP / ZeRO-3).
        gradients: Gradients held between backward and optimizer step.
        optimizer: Optimizer state held.
        workspace: Strategy buffers: DDP's gradient buckets, or the gathered layers of FSDP / ZeRO-3.
    """

    weights: int
    gradients: int
    optimizer: int
    workspace: int


def _units(backbone: nn.Module) -> list[list[nn.Parameter]]:
    """Parameters per FSDP unit: one per block, then the root unit (everything outside the blocks)."""
    blocks = list(find_blocks(backbone))
    inside = {id(p) for block in blocks for p in block.parameters()}
    units = [list(block.parameters()) for block in blocks]
    units.append([p for p in backbone.parameters() if id(p) not in inside])
    return units


def local_numel(param: nn.Parameter, devices: int, strategy: str) -> int:
    """Elements of ``param`` one device holds: FSDP2's padded dim-0 chunk, or ZeRO-3's padded flat partition."""
    if strategy == "fsdp" and param.ndim > 0:
        rows = param.shape[0]
        return math.ceil(rows / devices) * (param.numel() // rows if rows else 0)
    return math.ceil(param.numel() / devices)


def device_states(
    backbone: nn.Module,
    techniques: Techniques,
    strategy: str,
    devices: int,
    weights: int,
    trainable: int,
    optimizer_bytes_per_param: int,
) -> DeviceStates:
    """Model-state bytes per device of ``backbone`` (built on any device) trained with ``strategy``.

    Args:
        backbone: The backbone (its blocks define the FSDP units).
        techniques: The techniques; quantized weights cannot be sharded.
        strategy: One of :data:`PLAN_STRATEGIES`.
        devices: Devices (processes) taking part.
        weights: Weight bytes of the whole model (exact, :func:`~earthmind_compat.optimize.plan.count_weights`).
        trainable: Trainable parameters of the whole model.
        optimizer_bytes_per_param: Optimizer state bytes per trainable parameter.

    Raises:
        UnknownNameError: for an unknown strategy.
        ConfigurationError: for fewer than one device, ``single`` with more than one, or a sharded strategy with
            quantized weights.
    """
    if strategy not in PLAN_STRATEGIES:
        raise unknown_name("strategy", strategy, PLAN_STRATEGIES)
    if devices < 1 or (strategy == "single" and devices != 1):
        raise ConfigurationError(
            f"--devices {devices} does not go with --strategy {strategy}: use 1 device for 'single', "
            "or ddp / fsdp / deepspeed_stage_3 with 1 or more."
        )
    gradients, optimizer = 4 * trainable, optimizer_bytes_per_param * trainable
    if strategy in ("single", "ddp"):
        buckets = gradients if strategy == "ddp" and devices > 1 else 0
        return DeviceStates(weights, gradients, optimizer, buckets)
    if techniques.quantization:
        raise ConfigurationError(
            f"{strategy} cannot shard bitsandbytes 4/8-bit weights; plan ddp for quantized backbones "
            "(the quantized weights are small), or a sharded strategy without quantization."
        )
    units = _units(backbone)
    sizes = [sum(p.numel() for p in unit) for unit in units]
    local = [sum(local_numel(p, devices, strategy) for p in unit) for unit in units]
    trains = [any(p.requires_grad for p in unit) for unit in units]
    if techniques.lora:  # adapters and new modules are not on the meta backbone: their share, spread evenly
        trains = [False] * len(units)
    adapters = weights - 4 * sum(sizes)  # LoRA adapters (float32, inside the blocks): sharded like their units
    shard_weights = 4 * sum(local) + math.ceil(adapters / devices)
    sharded_trainable = sum(n for n, t in zip(local, trains, strict=True) if t)
    rest = trainable - sum(size for size, t in zip(sizes, trains, strict=True) if t)
    shard_trainable = sharded_trainable + math.ceil(rest / devices)
    largest = max(sizes[:-1])
    workspace = 4 * (sizes[-1] + 2 * largest + largest)
    return DeviceStates(shard_weights, 4 * shard_trainable, optimizer_bytes_per_param * shard_trainable, workspace)
