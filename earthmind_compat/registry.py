"""The only module that writes to TerraTorch's registries.

TerraTorch registers a constructor under its ``__name__`` and silently overwrites an existing entry.
:func:`register_all` instead checks each of our names first: an entry that is ours (same module and
qualified name, e.g. after ``importlib.reload``) is replaced, anything else under our name raises
:class:`RegistryConflictError`, so registering is idempotent and never clobbers somebody else's model.
"""

from __future__ import annotations

from collections.abc import Callable

from terratorch.registry import MODEL_FACTORY_REGISTRY, NECK_REGISTRY, TERRATORCH_BACKBONE_REGISTRY

from earthmind_compat.builders import BACKBONE_BUILDERS
from earthmind_compat.errors import RegistryConflictError
from earthmind_compat.necks import NECKS
from earthmind_compat.recipes import MODEL_FACTORIES


def _is_ours(existing: object, candidate: Callable) -> bool:
    return (
        getattr(existing, "__module__", None) == candidate.__module__
        and getattr(existing, "__qualname__", None) == candidate.__qualname__
    )


def _register(registry: object, store: dict, constructor: Callable, kind: str) -> None:
    name = constructor.__name__
    existing = store.get(name)
    if existing is not None and existing is not constructor and not _is_ours(existing, constructor):
        raise RegistryConflictError(
            f"TerraTorch's {kind} registry already holds {existing!r} under the name {name!r}, which "
            f"earthmind-compat needs for {constructor.__module__}.{constructor.__qualname__}. Import "
            "earthmind_compat before the package that registered it, or rename that entry."
        )
    registry.register(constructor)


def _neck_store() -> dict:
    return NECK_REGISTRY["terratorch"]._registry


def register_all() -> None:
    """Register every backbone, neck and model factory of earthmind-compat in TerraTorch (idempotent)."""
    backbone_store = TERRATORCH_BACKBONE_REGISTRY._registry
    for constructor in BACKBONE_BUILDERS.values():
        _register(TERRATORCH_BACKBONE_REGISTRY, backbone_store, constructor, "backbone")
    neck_registry = NECK_REGISTRY["terratorch"]
    for neck in NECKS:
        _register(neck_registry, _neck_store(), neck, "neck")
    for factory in MODEL_FACTORIES:
        _register(MODEL_FACTORY_REGISTRY, MODEL_FACTORY_REGISTRY._registry, factory, "model factory")


def registered_backbones() -> list[str]:
    """Names of our backbones that TerraTorch's backbone registry currently holds."""
    return sorted(name for name in BACKBONE_BUILDERS if name in TERRATORCH_BACKBONE_REGISTRY)
