"""Multi-process and sharded training: the Lightning strategies TerraTorch users pick, set up for our blocks.

- ``ddp``: one full replica per process; with LoRA or frozen quantized weights some parameters never get a
  gradient, so unused-parameter detection is switched off only when every parameter trains.
- ``fsdp``: shards parameters, gradients and optimizer state; each backbone block is its own FSDP unit
  (and its own checkpointing unit with ``activation_checkpointing=True``).
- ``deepspeed_stage_3``: ZeRO-3, when the ``deepspeed`` package is installed.

Use with TerraTorch: ``trainer: {strategy: ...}`` in YAML, or ``Trainer(strategy=lightning_strategy(...))``.
"""

from __future__ import annotations

from torch import nn

from earthmind_compat.errors import ConfigurationError, unknown_name
from earthmind_compat.optimize.families import block_classes
from earthmind_compat.optimize.quantize import is_quantized_linear

STRATEGIES = ("ddp", "fsdp", "deepspeed_stage_3")


def lightning_strategy(name: str, backbone: nn.Module, process_group_backend: str | None = None):
    """A Lightning strategy object for ``backbone``.

    Args:
        name: ``"ddp"``, ``"fsdp"`` or ``"deepspeed_stage_3"``.
        backbone: The built backbone (its block classes decide FSDP's wrapping).
        process_group_backend: ``"nccl"`` on GPUs, ``"gloo"`` on CPU (default: Lightning's choice).

    Raises:
        UnknownNameError: for an unknown strategy name.
        ConfigurationError: for DeepSpeed when it is not installed, or FSDP with bitsandbytes layers.
    """
    if name not in STRATEGIES:
        raise unknown_name("strategy", name, STRATEGIES)
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        every_param_trains = all(p.requires_grad for p in backbone.parameters())
        return DDPStrategy(find_unused_parameters=not every_param_trains, process_group_backend=process_group_backend)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        if any(is_quantized_linear(m) for m in backbone.modules()):
            raise ConfigurationError(
                "FSDP cannot shard bitsandbytes 4/8-bit layers built in place; use ddp for quantized backbones "
                "(the quantized weights are small), or FSDP without quantization."
            )
        blocks = block_classes(backbone)
        return FSDPStrategy(
            auto_wrap_policy=blocks,
            activation_checkpointing_policy=blocks if getattr(backbone, "optimized", None) else None,
            process_group_backend=process_group_backend,
            use_orig_params=True,
        )
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            "deepspeed_stage_3 needs the deepspeed package (pip install deepspeed; it builds CUDA extensions)."
        ) from exc
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=3)
