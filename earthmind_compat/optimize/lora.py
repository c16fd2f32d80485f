"""LoRA and QLoRA through peft, with each backbone's target modules, injected in place.

The adapters are injected with ``peft.inject_adapter_in_model``: the backbone stays the same object (its
``out_channels``, ``forward`` and state-dict keys are unchanged apart from the added ``lora_`` tensors), so
TerraTorch's factory, necks and checkpoints see an ordinary backbone. Only the adapter weights train.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from earthmind_compat.errors import ConfigurationError
from earthmind_compat.optimize.families import linear_paths, lora_targets

#: Name under which the adapters are registered (distinct from peft's "default", which TerraTorch's own
#: ``peft_config`` uses, so the two can never silently overwrite each other).
ADAPTER_NAME = "earthmind"

#: Defaults of :func:`add_lora`.
LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0}


def add_lora(
    backbone: nn.Module,
    r: int = LORA_DEFAULTS["r"],
    alpha: float = LORA_DEFAULTS["alpha"],
    dropout: float = LORA_DEFAULTS["dropout"],
    target_modules: Sequence[str] | None = None,
    kbit_prep: bool = False,
) -> nn.Module:
    """Add LoRA adapters to ``backbone`` in place and freeze everything else but its ``new_modules``.

    Args:
        backbone: An earthmind-compat backbone (quantized or not).
        r: Adapter rank.
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt (default: the backbone's, ``backbone.spec.lora_targets``; see
            :func:`earthmind_compat.optimize.families.lora_targets`).
        kbit_prep: Run peft's ``prepare_model_for_kbit_training`` first (QLoRA): freezes the base weights and
            upcasts half-precision non-quantized parameters to float32 for stable training.

    Returns:
        ``backbone`` itself, with adapters.

    Raises:
        ConfigurationError: for a non-positive rank, or if no module matches the targets.
    """
    from peft import LoraConfig, inject_adapter_in_model, prepare_model_for_kbit_training

    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigurationError(f"LoRA rank r must be a positive integer, got {r!r}.")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigurationError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")
    if has_lora(backbone):
        raise ConfigurationError(
            f"{type(backbone).__name__} already has LoRA adapters; add them once (either backbone_lora or "
            "TerraTorch's peft_config, not both)."
        )
    targets = list(target_modules) if target_modules is not None else list(lora_targets(backbone))
    if not linear_paths(backbone, targets):
        raise ConfigurationError(
            f"None of the LoRA target modules {targets} is a linear layer of {type(backbone).__name__}; "
            f"choose from the linear layers of its blocks, e.g. {sorted(lora_targets(backbone))}."
        )
    if kbit_prep:
        prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=False)
    for param in backbone.parameters():
        param.requires_grad_(False)
    # Injected child by child: peft treats a module with a transformers ``config`` as a transformers model and
    # expects attributes (``base_model_prefix``) our backbones do not have; their children are plain modules
    # or real transformers models.
    for child in backbone.children():
        paths = linear_paths(child, targets)
        if paths:
            config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=paths, bias="none")
            inject_adapter_in_model(config, child, adapter_name=ADAPTER_NAME)
    for name, param in backbone.named_parameters():
        param.requires_grad_(f"lora_A.{ADAPTER_NAME}" in name or f"lora_B.{ADAPTER_NAME}" in name)
    for name in getattr(backbone, "new_modules", ()):
        backbone.get_submodule(name).requires_grad_(True)  # freshly initialised: nothing to adapt, it must train
    return backbone


def has_lora(backbone: nn.Module) -> bool:
    """Whether ``backbone`` already holds LoRA adapters (ours or any other peft adapter)."""
    return any(name.endswith(("lora_A", "lora_B")) for name, _ in backbone.named_modules())


def lora_parameters(backbone: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters added by :func:`add_lora`."""
    return [p for n, p in backbone.named_parameters() if f".{ADAPTER_NAME}" in n and "lora_" in n]
