"""Activation checkpointing through one call, across the transformers versions that renamed it.

transformers 5.x calls it ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` is a
deprecated alias, removal announced for v6); 4.x only has ``gradient_checkpointing_enable``. Since about
4.52, each layer class derives from ``GradientCheckpointingLayer`` and checkpoints itself when called, which
is what our backbones need: they run their blocks one by one instead of through the model's own loop.
Where the blocks are not such layers (older releases, or a backbone's own blocks), each block's ``forward``
is wrapped with ``torch.utils.checkpoint`` directly. Both paths use non-reentrant checkpointing, so frozen
(LoRA, quantized) models need no ``enable_input_require_grads`` trick.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from earthmind_compat.errors import ConfigurationError
from earthmind_compat.optimize.families import find_blocks

#: Name of the transformers method, newest first.
ENABLE_METHODS = ("activation_checkpointing_enable", "gradient_checkpointing_enable")


def _checkpoint_layer_class() -> type | None:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers older than the per-layer checkpointing refactor
        return None
    return GradientCheckpointingLayer


def _owning_models(backbone: nn.Module) -> list[nn.Module]:
    """The transformers models inside ``backbone`` that can checkpoint (outermost first, nested ones skipped)."""
    from transformers import PreTrainedModel

    owners: list[nn.Module] = []
    for module in backbone.modules():
        if (
            isinstance(module, PreTrainedModel)
            and module.supports_gradient_checkpointing
            and not any(any(module is m for m in o.modules()) for o in owners)
        ):
            owners.append(module)
    return owners


def _call_first(model: nn.Module, names: tuple[str, ...], **kwargs: object) -> str:
    for name in names:
        method = getattr(model, name, None)
        if callable(method):
            method(**kwargs)
            return name
    raise ConfigurationError(f"{type(model).__name__} has none of {names}; this transformers version is unsupported.")


def _wrap_forward(block: nn.Module) -> None:
    if getattr(block, "_earthmind_checkpointed", False):
        return
    original = block.forward

    @functools.wraps(original)
    def forward(*args: object, **kwargs: object):
        if block.training and torch.is_grad_enabled():
            return checkpoint(original, *args, use_reentrant=False, **kwargs)
        return original(*args, **kwargs)

    block.forward = forward
    block._earthmind_checkpointed = True


def enable_checkpointing(backbone: nn.Module) -> str:
    """Checkpoint every block of ``backbone`` during training (recomputed in the backward pass).

    Args:
        backbone: An earthmind-compat backbone (or any module with a list of blocks).

    Returns:
        How it was done: the transformers method name used, or ``"torch.utils.checkpoint"``.

    Raises:
        ConfigurationError: if the backbone has no blocks or checkpointing could not be switched on.
    """
    blocks = find_blocks(backbone)
    layer_class = _checkpoint_layer_class()
    if layer_class is not None and all(isinstance(b, layer_class) for b in blocks):
        used = None
        for owner in _owning_models(backbone):
            used = _call_first(owner, ENABLE_METHODS, **{_kwargs_name(owner): {"use_reentrant": False}})
        if used is not None and all(getattr(b, "gradient_checkpointing", False) for b in blocks):
            return used
    for block in blocks:
        _wrap_forward(block)
    return "torch.utils.checkpoint"


def _kwargs_name(model: nn.Module) -> str:
    """Keyword of the checkpoint kwargs: ``activation_checkpointing_kwargs`` in 5.x, else the 4.x name."""
    if callable(getattr(model, "activation_checkpointing_enable", None)):
        return "activation_checkpointing_kwargs"
    return "gradient_checkpointing_kwargs"


def is_checkpointing(backbone: nn.Module) -> bool:
    """Whether every block of ``backbone`` is checkpointed."""
    return all(
        getattr(b, "gradient_checkpointing", False) or getattr(b, "_earthmind_checkpointed", False)
        for b in find_blocks(backbone)
    )
