"""Exceptions raised by earthmind-compat.

Every error is a subclass of :class:`EarthMindCompatError` and of the closest built-in type, so callers
can catch either. None of them derives from ``KeyError``: TerraTorch's registries swallow a ``KeyError``
raised inside a constructor and report "could not be instantiated from any source" instead, which would
hide the real message.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EarthMindCompatError(Exception):
    """Base class of every error raised by earthmind-compat."""


class ConfigurationError(EarthMindCompatError, ValueError):
    """A constructor argument is invalid or contradicts another one."""


class UnknownNameError(EarthMindCompatError, ValueError):
    """A backbone, neck, preset, decoder or technique name is not known."""


class InputError(EarthMindCompatError, ValueError):
    """A tensor given to ``forward`` has the wrong shape, dtype or values."""


class RegistryConflictError(EarthMindCompatError, RuntimeError):
    """A different object is already registered under one of our names."""


class WeightsError(EarthMindCompatError, OSError):
    """Weights could not be found, read or matched to the model."""


class UnsafeCheckpointError(WeightsError):
    """A checkpoint would need pickle or remote code, which are refused by default."""


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return a "did you mean" hint for ``name`` among ``choices``.

    Args:
        name: The unknown name the user gave.
        choices: The valid names.
        n: How many suggestions to offer at most.

    Returns:
        A sentence fragment such as ``" Did you mean 'granite_4_tiny'?"`` or an empty string.
    """
    close = difflib.get_close_matches(str(name), sorted(choices), n=n, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> UnknownNameError:
    """Build an :class:`UnknownNameError` that lists the valid names and the closest ones.

    Args:
        kind: What was looked up, e.g. ``"backbone"`` or ``"preset"``.
        name: The name the user gave.
        choices: The valid names.

    Returns:
        The error, ready to raise.
    """
    choices = sorted(choices)
    return UnknownNameError(
        f"Unknown {kind} {name!r}.{did_you_mean(name, choices)} Valid {kind}s: {', '.join(choices)}."
    )
