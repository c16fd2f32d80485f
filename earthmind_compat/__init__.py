"""earthmind-compat: EarthMind, InternVL2.5-4B and Granite 4.0 Tiny as TerraTorch backbones.

Importing this package registers the backbones (and necks) in TerraTorch's registries, so that
``BACKBONE_REGISTRY.build("internvl2_5_4b", preset="tiny")`` and ``backbone: internvl2_5_4b`` in a
TerraTorch YAML config work.
"""

from __future__ import annotations

from earthmind_compat.gc_pause import garbage_collection_paused

# The imports below build about a million long-lived objects (torch, transformers, TerraTorch); collecting
# meanwhile only walks them again (see earthmind_compat.gc_pause).
with garbage_collection_paused():
    from earthmind_compat.compat import UntestedVersionWarning, require_native_model_classes, warn_if_untested

    require_native_model_classes()

    from earthmind_compat.backbones import BACKBONE_CLASSES, GraniteBackbone, InternVLBackbone
    from earthmind_compat.builders import build_backbone
    from earthmind_compat.errors import (
        ConfigurationError,
        EarthMindCompatError,
        InputError,
        RegistryConflictError,
        UnknownNameError,
        UnsafeCheckpointError,
        WeightsError,
    )
    from earthmind_compat.registry import register_all, registered_backbones

    warn_if_untested()
    register_all()

__version__ = "0.1.0"

#: Names of every backbone this package registers in TerraTorch.
BACKBONES: tuple[str, ...] = tuple(sorted(BACKBONE_CLASSES))

__all__ = [
    "BACKBONES",
    "ConfigurationError",
    "EarthMindCompatError",
    "GraniteBackbone",
    "InputError",
    "InternVLBackbone",
    "RegistryConflictError",
    "UnknownNameError",
    "UnsafeCheckpointError",
    "UntestedVersionWarning",
    "WeightsError",
    "__version__",
    "build_backbone",
    "register_all",
    "registered_backbones",
]
