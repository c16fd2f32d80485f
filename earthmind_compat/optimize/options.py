"""Backbone constructor options that switch techniques on, for Python and TerraTorch YAML alike.

Every registered earthmind-compat backbone (:mod:`earthmind_compat.builders`) accepts these keyword arguments
(``backbone_<name>`` in a TerraTorch config); the builder takes them out, checks them, builds the backbone
class without them and applies them once it is built:

- ``quantization``: ``"int8"``, ``"nf4"``, ``"fp4"``, ``"nf4+dq"``, or a mapping
  ``{type: nf4, double_quant: true, experts: true}``.
- ``lora``: ``true`` or a mapping ``{r: 8, alpha: 16, dropout: 0.0, target_modules: [...]}``.
- ``activation_checkpointing``: ``true`` / ``false``, or a mapping ``{every: 2}`` (checkpoint every second block:
  less recompute, more memory; ``every: 1`` is ``true``).
- ``technique``: a whole technique string instead of the three above, e.g. ``"qlora+ckpt"``.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from earthmind_compat.arguments import check_booleans
from earthmind_compat.errors import ConfigurationError, did_you_mean
from earthmind_compat.optimize.apply import apply
from earthmind_compat.optimize.checkpointing import check_every
from earthmind_compat.optimize.techniques import parse_technique

#: Constructor keywords handled here.
OPTION_KEYS = ("technique", "quantization", "lora", "activation_checkpointing")

_QUANT_KEYS = ("type", "double_quant", "experts")
_LORA_KEYS = ("r", "alpha", "dropout", "target_modules")
_CHECKPOINTING_KEYS = ("every",)


def _check_keys(what: str, given: Mapping, allowed: tuple[str, ...]) -> None:
    for key in given:
        if key not in allowed:
            raise ConfigurationError(
                f"Unknown key {key!r} in backbone {what}.{did_you_mean(key, allowed)} Valid keys: {', '.join(allowed)}."
            )


def resolve_options(options: Mapping[str, object]) -> tuple[str, dict]:
    """Turn constructor options into a technique string and :func:`~earthmind_compat.optimize.apply` kwargs.

    Raises:
        ConfigurationError: for malformed values or ``technique`` combined with the other keys.
    """
    technique = options.get("technique")
    others = [k for k in OPTION_KEYS[1:] if options.get(k) not in (None, False)]
    if technique is not None and others:
        raise ConfigurationError(
            f"Give either technique={technique!r} or {others}, not both (technique is the shorthand for them)."
        )
    kwargs: dict = {}
    if technique is not None:
        return parse_technique(technique).name, kwargs
    parts: list[str] = []
    quantization = options.get("quantization")
    if isinstance(quantization, Mapping):
        _check_keys("quantization", quantization, _QUANT_KEYS)
        if "type" not in quantization:
            raise ConfigurationError("backbone quantization mapping needs a 'type' (int8, nf4 or fp4).")
        check_booleans("backbone quantization", quantization, ["double_quant", "experts"])
        parts.append(str(quantization["type"]))
        if quantization.get("double_quant", False):
            parts.append("dq")
        kwargs["quantize_moe_experts"] = quantization.get("experts", True)
    elif isinstance(quantization, str):
        parts.append(quantization)
    elif quantization is not None:
        raise ConfigurationError(
            f"backbone quantization must be a name such as 'nf4' or a mapping, got {quantization!r}."
        )
    lora = options.get("lora")
    if isinstance(lora, Mapping):
        _check_keys("lora", lora, _LORA_KEYS)
        parts.append("lora")
        for key in _LORA_KEYS:
            if key in lora:
                kwargs[f"lora_{key}"] = lora[key]
    elif lora is True:
        parts.append("lora")
    elif lora not in (None, False):
        raise ConfigurationError(f"backbone lora must be true/false or a mapping of LoRA settings, got {lora!r}.")
    checkpointing = options.get("activation_checkpointing")
    if isinstance(checkpointing, Mapping):
        _check_keys("activation_checkpointing", checkpointing, _CHECKPOINTING_KEYS)
        parts.append("ckpt")
        if "every" in checkpointing:
            kwargs["checkpoint_every"] = check_every(checkpointing["every"])
    elif checkpointing not in (None, False, True):
        raise ConfigurationError(
            f"backbone activation_checkpointing must be true, false or a mapping such as {{every: 2}}, "
            f"got {checkpointing!r}."
        )
    elif checkpointing:
        parts.append("ckpt")
    return parse_technique("+".join(parts)).name, kwargs


def apply_options(backbone: nn.Module, options: Mapping[str, object]) -> None:
    """Apply constructor options to a freshly built backbone (no-op when none are set)."""
    technique, kwargs = resolve_options(options)
    if technique == "none" and not kwargs:
        return
    apply(backbone, technique, **kwargs)
