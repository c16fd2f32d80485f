"""Where each backbone keeps its repeated blocks and which of its layers LoRA adapts.

Everything here works from the backbone object itself (its spec and its modules): the LoRA targets are
``backbone.spec.lora_targets``, and a backbone whose spec pins none gets the linear layers found inside its
blocks.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from earthmind_compat.backbones.base import TokenBackbone
from earthmind_compat.errors import ConfigurationError


def find_blocks(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's repeated blocks, in one ``nn.ModuleList``.

    Those of its ``block_lists`` in order when it declares them (e.g. a vision tower's layers, then the language
    layers run after it), or else the ``nn.ModuleList`` holding the most parameters.

    Raises:
        ConfigurationError: if the backbone holds no ``nn.ModuleList`` with parameters.
    """
    declared = getattr(backbone, "block_lists", None)
    if declared:
        return nn.ModuleList([block for blocks in declared for block in blocks])
    best, best_size = None, 0
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    if best is None:
        raise ConfigurationError(f"{type(backbone).__name__} has no list of blocks (nn.ModuleList) to optimize.")
    return best


def replace_blocks(backbone: nn.Module, make: Callable[[nn.Module], nn.Module]) -> None:
    """Put ``make(block)`` in the place of every block :func:`find_blocks` returns, in the backbone itself.

    :func:`find_blocks` joins declared ``block_lists`` into a new list; this writes into the backbone's own lists.
    """
    declared = getattr(backbone, "block_lists", None)
    for blocks in declared or (find_blocks(backbone),):
        for index, block in enumerate(blocks):
            blocks[index] = make(block)


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:
        import bitsandbytes as bnb

        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        pass
    return tuple(types)


#: Path components whose linear layers LoRA never adapts: MoE expert stacks (split per expert when quantized)
#: and MoE routers (transformers 4.x's Granite router is a linear layer named ``router.layer``; 5.x's holds a
#: bare weight). Adapting a router would change which experts a token reaches.
NOT_ADAPTED = ("experts", "router")


def derived_lora_targets(backbone: nn.Module) -> tuple[str, ...]:
    """Names of the linear layers inside the blocks (last path component), excluding MoE experts and routers.

    This is what a backbone without pinned LoRA targets gets, and what the pinned lists are checked against.
    """
    linear = _linear_types()
    names: list[str] = []
    for path, module in find_blocks(backbone).named_modules():
        if isinstance(module, linear) and not set(path.split(".")[:-1]) & set(NOT_ADAPTED):
            name = path.rsplit(".", 1)[-1]
            if name not in names:
                names.append(name)
    return tuple(names)


def linear_paths(module: nn.Module, names: tuple[str, ...] | list[str]) -> list[str]:
    """Paths inside ``module`` of the linear layers whose last path component is one of ``names``.

    peft matches ``target_modules`` as path suffixes and refuses a matched module it cannot adapt. In
    transformers 4.x Granite's routed experts are ``GraniteMoeHybridParallelExperts`` (a 3-D weight) named
    ``input_linear`` / ``output_linear`` like the shared MLP's linear layers, so targets are handed to peft
    as the full paths of real linear layers.
    """
    linear = _linear_types()
    wanted = set(names)
    return [
        path
        for path, child in module.named_modules()
        if path and path.rsplit(".", 1)[-1] in wanted and isinstance(child, linear)
    ]


def lora_targets(backbone: nn.Module) -> tuple[str, ...]:
    """LoRA target module names for ``backbone``: its spec's pinned list, or the derived one where none is pinned.

    A pinned list is extended by the ``extra_lora_targets`` of blocks the backbone's settings add (language layers).

    Raises:
        ConfigurationError: if the module is not an earthmind-compat backbone.
    """
    if not isinstance(backbone, TokenBackbone):
        raise ConfigurationError(
            f"{type(backbone).__name__} is not an earthmind-compat backbone (it has no spec with LoRA targets); "
            "optimize techniques apply to earthmind-compat backbones (build one with earthmind_compat.build_backbone "
            "or BACKBONE_REGISTRY.build), or pass the target modules yourself."
        )
    pinned = backbone.spec.lora_targets
    if pinned is None:
        return derived_lora_targets(backbone)
    # blocks a backbone adds by its settings (e.g. language layers) pin their own targets
    extra = tuple(name for name in getattr(backbone, "extra_lora_targets", ()) if name not in pinned)
    return tuple(pinned) + extra


def block_classes(backbone: nn.Module) -> set[type]:
    """Classes of the repeated blocks (FSDP wraps and checkpointing policies use them)."""
    return {type(block) for block in find_blocks(backbone)}
