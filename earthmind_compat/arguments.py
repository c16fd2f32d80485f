"""Checks shared by every constructor that reads user arguments: booleans and dtypes.

YAML and command lines hand over strings easily (``"false"``, ``"yes"``, ``"bf16"``); Python's truthiness
would read ``"false"`` as True. These checks accept the real type only and name the fix otherwise.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch

from earthmind_compat.errors import ConfigurationError

#: Spellings accepted for ``dtype=``, by torch dtype.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

#: The dtype every backbone computes in unless told otherwise (see :func:`resolve_dtype`).
DEFAULT_DTYPE = torch.float32


def boolean_parameters(function: Callable) -> list[str]:
    """Names of the parameters of ``function`` that take a boolean (a ``bool`` default or annotation)."""
    names = []
    for name, parameter in inspect.signature(function).parameters.items():
        annotation = parameter.annotation
        if isinstance(parameter.default, bool) or annotation is bool or annotation == "bool":
            names.append(name)
    return names


def check_booleans(owner: str, values: Mapping[str, object], names: list[str]) -> None:
    """Raise unless every argument in ``names`` that was given is a real ``bool``.

    Args:
        owner: Class or function name used in the message.
        values: The arguments as passed (keyword name to value).
        names: The boolean parameters to check (see :func:`boolean_parameters`).

    Raises:
        ConfigurationError: naming the argument, the value and its type.
    """
    for name in names:
        if name in values and not isinstance(values[name], bool):
            value = values[name]
            raise ConfigurationError(
                f"{owner} argument {name} must be true or false, got {value!r} ({type(value).__name__}). "
                "Write a YAML boolean (true / false, unquoted) or a Python bool; strings such as 'false' are "
                "refused because Python would read them as True."
            )


def check_boolean_call(function: Callable, owner: str, args: tuple, kwargs: Mapping[str, object]) -> None:
    """:func:`check_booleans` for a call of ``function`` with ``args`` and ``kwargs`` (``self`` included)."""
    try:
        bound = inspect.signature(function).bind_partial(*args, **kwargs)
    except TypeError:
        return  # the call itself will raise Python's own, clear, TypeError
    check_booleans(owner, bound.arguments, boolean_parameters(function))


def resolve_dtype(dtype: object) -> torch.dtype:
    """Turn a ``dtype=`` argument into a floating torch dtype.

    Args:
        dtype: ``None`` (float32), a torch floating dtype, or one of :data:`DTYPE_NAMES`.

    Raises:
        ConfigurationError: for anything else, listing the accepted names.
    """
    if dtype is None:
        return DEFAULT_DTYPE
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPE_NAMES.values():
            return dtype
    elif isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in DTYPE_NAMES:
            return DTYPE_NAMES[key]
    raise ConfigurationError(
        f"dtype={dtype!r} is not a supported compute dtype; use one of {', '.join(DTYPE_NAMES)} "
        "(or leave it unset for float32)."
    )
