"""Where each backbone family keeps its repeated blocks and which of its layers LoRA adapts.

Everything here works from the backbone object itself (its ``family`` attribute and its modules), so a
backbone added to :data:`earthmind_compat.backbones.BACKBONE_BUILDERS` later joins without an edit: an
unknown family gets the linear layers found inside its blocks as LoRA targets.
"""

from __future__ import annotations

from torch import nn

from earthmind_compat.errors import ConfigurationError

#: LoRA target module names (peft matches them as suffixes of module paths), per family. Pinned here so a
#: rename in a transformers release is noticed: a test compares them with :func:`derived_lora_targets`.
FAMILY_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    # InternViT: attention projections and the MLP.
    "internvl": ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2"),
    # Granite 4.0 H: attention projections, Mamba in/out projections and the shared MLP. The 64 routed experts
    # per layer are left out (LoRA on each would multiply adapters by 64; they are quantized instead).
    "granite": ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "input_linear", "output_linear"),
}


def family_of(backbone: nn.Module) -> str:
    """The ``family`` attribute of a backbone (``"internvl"``, ``"granite"``, ...).

    Raises:
        ConfigurationError: if the module has no ``family`` attribute (it is not one of our backbones).
    """
    family = getattr(backbone, "family", None)
    if not isinstance(family, str):
        raise ConfigurationError(
            f"{type(backbone).__name__} has no 'family' attribute; optimize techniques apply to earthmind-compat "
            "backbones (build one with earthmind_compat.build_backbone or BACKBONE_REGISTRY.build)."
        )
    return family


def find_blocks(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's repeated blocks: the ``nn.ModuleList`` holding the most parameters.

    Raises:
        ConfigurationError: if the backbone holds no ``nn.ModuleList`` with parameters.
    """
    best, best_size = None, 0
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    if best is None:
        raise ConfigurationError(f"{type(backbone).__name__} has no list of blocks (nn.ModuleList) to optimize.")
    return best


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:
        import bitsandbytes as bnb

        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        pass
    return tuple(types)


def derived_lora_targets(backbone: nn.Module) -> tuple[str, ...]:
    """Names of the linear layers inside the blocks (last path component), excluding MoE expert stacks.

    This is what an unknown family gets as LoRA targets, and what the pinned lists are checked against.
    """
    linear = _linear_types()
    names: list[str] = []
    for path, module in find_blocks(backbone).named_modules():
        if isinstance(module, linear) and ".experts." not in f".{path}.":
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
    """LoRA target module names for ``backbone``: the pinned family list, or the derived one for a new family."""
    return FAMILY_LORA_TARGETS.get(family_of(backbone)) or derived_lora_targets(backbone)


def block_classes(backbone: nn.Module) -> set[type]:
    """Classes of the repeated blocks (FSDP wraps and checkpointing policies use them)."""
    return {type(block) for block in find_blocks(backbone)}
