"""Backbone constructor options that switch techniques on, for Python and TerraTorch YAML alike.

Every earthmind-compat backbone accepts these keyword arguments (``backbone_<name>`` in a TerraTorch
config); they are taken out before the backbone's own ``__init__`` runs and applied once it has finished:

- ``quantization``: ``"int8"``, ``"nf4"``, ``"fp4"``, ``"nf4+dq"``, or a mapping
  ``{type: nf4, double_quant: true, experts: true}``.
- ``lora``: ``true`` or a mapping ``{r: 8, alpha: 16, dropout: 0.0, target_modules: [...]}``.
- ``activation_checkpointing``: ``true`` / ``false``.
- ``technique``: a whole technique string instead of the three above, e.g. ``"qlora+ckpt"``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping

from torch import nn

from earthmind_compat.arguments import check_boolean_call, check_booleans
from earthmind_compat.errors import ConfigurationError, did_you_mean

#: Constructor keywords handled here.
OPTION_KEYS = ("technique", "quantization", "lora", "activation_checkpointing")

_QUANT_KEYS = ("type", "double_quant", "experts")
_LORA_KEYS = ("r", "alpha", "dropout", "target_modules")


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
    from earthmind_compat.optimize.techniques import parse_technique

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
    if checkpointing not in (None, False, True):
        raise ConfigurationError(f"backbone activation_checkpointing must be true or false, got {checkpointing!r}.")
    if checkpointing:
        parts.append("ckpt")
    return parse_technique("+".join(parts)).name, kwargs


def apply_options(backbone: nn.Module, options: Mapping[str, object]) -> None:
    """Apply constructor options to a freshly built backbone (no-op when none are set)."""
    technique, kwargs = resolve_options(options)
    if technique == "none" and not kwargs:
        return
    from earthmind_compat.optimize.apply import apply

    apply(backbone, technique, **kwargs)


def wrap_constructor(cls: type) -> None:
    """Make ``cls.__init__`` accept :data:`OPTION_KEYS` and apply them after the outermost ``__init__``.

    Called from ``TokenBackbone.__init_subclass__``; a subclass calling ``super().__init__`` gets the
    techniques applied once, after its own modules exist.
    """
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_earthmind_options", False):
        return

    @functools.wraps(init)
    def __init__(self, *args: object, **kwargs: object) -> None:
        options = {key: kwargs.pop(key) for key in OPTION_KEYS if key in kwargs}
        outermost = not self.__dict__.get("_earthmind_constructing", False)
        if outermost:
            check_boolean_call(init, cls.__name__, (self, *args), kwargs)  # "false" is not False
            resolve_options(options)  # fail on bad options before building anything
            self.__dict__["_earthmind_constructing"] = True
        try:
            init(self, *args, **kwargs)
        finally:
            if outermost:
                self.__dict__.pop("_earthmind_constructing", None)
        if outermost:
            apply_options(self, options)

    signature = inspect.signature(init)
    params = list(signature.parameters.values())
    extra = [inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None) for key in OPTION_KEYS]
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    __init__.__signature__ = signature.replace(parameters=rest + extra + var_kw)
    __init__._earthmind_options = True
    cls.__init__ = __init__
