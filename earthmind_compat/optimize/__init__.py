"""Making 4-7 B backbones fit: quantization, LoRA / QLoRA, activation checkpointing and a memory planner.

From Python::

    from earthmind_compat import optimize
    backbone = build_backbone("internvl2_5_4b", preset="full")
    optimize.apply(backbone, "qlora+ckpt")

From a TerraTorch config, through the backbone constructor (``backbone_`` keys)::

    backbone: internvl2_5_4b
    backbone_quantization: nf4
    backbone_lora: {r: 16, alpha: 32}
    backbone_activation_checkpointing: true
"""

from __future__ import annotations

from earthmind_compat.optimize.adapters import AdapterExport, export_adapters, load_adapters, merge_lora
from earthmind_compat.optimize.apply import Applied, apply
from earthmind_compat.optimize.checkpointing import enable_checkpointing, is_checkpointing
from earthmind_compat.optimize.experts import QuantizedExperts, QuantizedParallelExperts, quantize_experts
from earthmind_compat.optimize.families import find_blocks, lora_targets
from earthmind_compat.optimize.lora import add_lora, lora_parameters
from earthmind_compat.optimize.options import OPTION_KEYS
from earthmind_compat.optimize.quantize import (
    bnb_config,
    load_quantized,
    memory_bytes,
    quantize_linears,
    stored_bytes,
    weight_share,
)
from earthmind_compat.optimize.techniques import TECHNIQUES, Techniques, parse_technique

__all__ = [
    "OPTION_KEYS",
    "TECHNIQUES",
    "AdapterExport",
    "Applied",
    "QuantizedExperts",
    "QuantizedParallelExperts",
    "Techniques",
    "add_lora",
    "apply",
    "bnb_config",
    "enable_checkpointing",
    "export_adapters",
    "find_blocks",
    "is_checkpointing",
    "load_adapters",
    "load_quantized",
    "lora_parameters",
    "lora_targets",
    "memory_bytes",
    "merge_lora",
    "parse_technique",
    "quantize_experts",
    "quantize_linears",
    "stored_bytes",
    "weight_share",
]
