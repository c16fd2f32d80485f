"""Activation checkpointing through one call, across the transformers versions that renamed it.

transformers 5.x calls it ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` is a
deprecated alias, removal announced for v6); 4.x only has ``gradient_checkpointing_enable``. Since about
4.52, each layer class derives from ``GradientCheckpointingLayer`` and checkpoints itself when called, which
is what our backbones need: they run their blocks one by one instead of through the model's own loop.
Where the blocks are not such layers (older releases, or a backbone's own blocks), each block's ``forward``
is wrapped with ``torch.utils.checkpoint`` directly. Both paths use non-reentrant checkpointing, so frozen
(LoRA, quantized) models need no ``enable_input_require_grads`` trick.

Granularity: ``every=n`` checkpoints every n-th block (blocks 0, n, 2n, ... in
:func:`~earthmind_compat.optimize.families.find_blocks` order) and lets the others keep their activations: less
recompute for more memory, between checkpointing every block (``every=1``, the default) and none.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from earthmind_compat.errors import ConfigurationError
from earthmind_compat.optimize.families import find_blocks
from earthmind_compat.optimize.techniques import Techniques

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


def check_every(every: object) -> int:
    """Check the checkpointing granularity: an ``int`` >= 1 (1: every block, 2: every second block, ...).

    Raises:
        ConfigurationError: for anything else (a ``bool`` included), naming the value and the fix.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigurationError(
            f"activation checkpointing 'every' must be an integer >= 1 (1 checkpoints every block, 2 every second "
            f"block, ...), got {every!r} ({type(every).__name__})."
        )
    return every


def check_granularity(every: object, techniques: Techniques) -> int:
    """:func:`check_every`, and refuse a granularity other than 1 for a technique without ``ckpt``.

    Raises:
        ConfigurationError: naming the value and the fix.
    """
    check_every(every)
    if every != 1 and not techniques.checkpointing:
        with_ckpt = "ckpt" if techniques.name == "none" else f"{techniques.name}+ckpt"
        raise ConfigurationError(
            f"checkpoint_every={every} sets the granularity of activation checkpointing, but technique "
            f"{techniques.name!r} does not checkpoint; add 'ckpt' ({with_ckpt!r})."
        )
    return every


def chosen_blocks(count: int, every: int = 1) -> list[int]:
    """Indices of the blocks checkpointed among ``count`` blocks at granularity ``every``: 0, every, 2 * every, ..."""
    return list(range(0, count, check_every(every)))


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


def enable_checkpointing(backbone: nn.Module, every: int = 1) -> str:
    """Checkpoint the blocks of ``backbone`` during training (recomputed in the backward pass).

    Args:
        backbone: An earthmind-compat backbone (or any module with a list of blocks).
        every: Checkpoint every ``every``-th block (:func:`chosen_blocks`); 1 (default) checkpoints them all.

    Returns:
        How it was done: the transformers method name used, or ``"torch.utils.checkpoint"``.

    Raises:
        ConfigurationError: if the backbone has no blocks, checkpointing could not be switched on, or ``every`` is
            not an integer >= 1.
    """
    blocks = find_blocks(backbone)
    chosen = set(chosen_blocks(len(blocks), every))
    layer_class = _checkpoint_layer_class()
    if layer_class is not None and all(isinstance(b, layer_class) for b in blocks):
        used = None
        for owner in _owning_models(backbone):
            used = _call_first(owner, ENABLE_METHODS, **{_kwargs_name(owner): {"use_reentrant": False}})
        if used is not None and all(getattr(b, "gradient_checkpointing", False) for b in blocks):
            for index, block in enumerate(blocks):  # over all blocks of the backbone, not per owning model
                block.gradient_checkpointing = index in chosen
            return used
    for index, block in enumerate(blocks):
        if index in chosen:
            _wrap_forward(block)
    return "torch.utils.checkpoint"


def _kwargs_name(model: nn.Module) -> str:
    """Keyword of the checkpoint kwargs: ``activation_checkpointing_kwargs`` in 5.x, else the 4.x name."""
    if callable(getattr(model, "activation_checkpointing_enable", None)):
        return "activation_checkpointing_kwargs"
    return "gradient_checkpointing_kwargs"


def checkpointed_blocks(backbone: nn.Module) -> list[int]:
    """Indices (in :func:`~earthmind_compat.optimize.families.find_blocks` order) of the checkpointed blocks."""
    return [
        index
        for index, block in enumerate(find_blocks(backbone))
        if getattr(block, "gradient_checkpointing", False) or getattr(block, "_earthmind_checkpointed", False)
    ]


def is_checkpointing(backbone: nn.Module, every: int = 1) -> bool:
    """Whether exactly the blocks of granularity ``every`` are checkpointed (``every=1``: every block)."""
    return checkpointed_blocks(backbone) == chosen_blocks(len(find_blocks(backbone)), every)
