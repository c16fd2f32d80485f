"""One call that applies a technique string to a built backbone: ``apply(backbone, "nf4+lora+ckpt")``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from earthmind_compat.optimize.checkpointing import check_granularity, enable_checkpointing
from earthmind_compat.optimize.experts import quantize_experts
from earthmind_compat.optimize.families import lora_targets
from earthmind_compat.optimize.lora import LORA_DEFAULTS, add_lora
from earthmind_compat.optimize.quantize import quantize_linears
from earthmind_compat.optimize.techniques import Techniques, parse_technique


@dataclass
class Applied:
    """What :func:`apply` did to a backbone.

    Attributes:
        technique: Canonical technique string.
        quantized_layers: Paths of linear layers replaced by bitsandbytes layers.
        quantized_experts: Paths of MoE expert stacks split into quantized per-expert layers.
        lora_targets: LoRA target module names (empty without LoRA).
        checkpointing: How checkpointing was switched on (empty without it).
        checkpoint_every: Checkpointing granularity: every n-th block is checkpointed (1: all; 0 without it).
        trainable_parameters: Parameters that still receive gradients.
    """

    technique: str
    quantized_layers: list[str] = field(default_factory=list)
    quantized_experts: list[str] = field(default_factory=list)
    lora_targets: list[str] = field(default_factory=list)
    checkpointing: str = ""
    checkpoint_every: int = 0
    trainable_parameters: int = 0


def apply(
    backbone: nn.Module,
    technique: str | Techniques | None,
    *,
    lora_r: int = LORA_DEFAULTS["r"],
    lora_alpha: float = LORA_DEFAULTS["alpha"],
    lora_dropout: float = LORA_DEFAULTS["dropout"],
    lora_target_modules: Sequence[str] | None = None,
    compute_dtype: torch.dtype | None = None,
    quantize_moe_experts: bool = True,
    checkpoint_every: int = 1,
) -> Applied:
    """Apply quantization, LoRA/QLoRA and activation checkpointing to ``backbone`` in place.

    The order is fixed: quantize linear layers, split and quantize MoE experts, prepare for k-bit training,
    add LoRA, switch on checkpointing.

    Args:
        backbone: A built earthmind-compat backbone with its weights loaded.
        technique: E.g. ``"nf4"``, ``"qlora+ckpt"``, ``"int8+lora"``; see
            :data:`earthmind_compat.optimize.TECHNIQUES`.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        lora_target_modules: Override the backbone's LoRA targets (``spec.lora_targets``).
        compute_dtype: dtype of 4-bit matmuls (default: the input's).
        quantize_moe_experts: Also quantize MoE expert stacks (Granite); False leaves them in full precision.
        checkpoint_every: With ``ckpt``, checkpoint every n-th block only (1, the default: every block); the others
            keep their activations (less recompute, more memory).

    Returns:
        An :class:`Applied` summary.

    Raises:
        UnknownNameError: for an unknown technique name.
        ConfigurationError: for contradicting techniques, a backbone they cannot apply to, or ``checkpoint_every``
            that is not an integer >= 1 or is given without ``ckpt``.
    """
    techniques = parse_technique(technique)
    check_granularity(checkpoint_every, techniques)
    done = Applied(techniques.name)
    if techniques.quantization:
        done.quantized_layers = quantize_linears(
            backbone, techniques.quantization, techniques.double_quant, compute_dtype
        )
        if quantize_moe_experts:
            done.quantized_experts = quantize_experts(
                backbone, techniques.quantization, techniques.double_quant, compute_dtype
            )
    if techniques.lora:
        add_lora(backbone, lora_r, lora_alpha, lora_dropout, lora_target_modules, kbit_prep=techniques.kbit_prep)
        done.lora_targets = list(lora_target_modules or lora_targets(backbone))
    if techniques.checkpointing:
        done.checkpointing = enable_checkpointing(backbone, checkpoint_every)
        done.checkpoint_every = checkpoint_every
    done.trainable_parameters = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    backbone.optimized = done
    return done
