"""The backbone classes, one module per family, and their lookup by registered name.

Each class carries its facts in its :class:`~earthmind_compat.backbones.base.BackboneSpec` (``cls.spec``).
The functions TerraTorch registers, which also apply the memory techniques, are in
:mod:`earthmind_compat.builders`.
"""

from __future__ import annotations

from earthmind_compat.backbones.base import BackboneSpec, CheckpointLayout, TokenBackbone
from earthmind_compat.backbones.earthmind import EarthMindBackbone
from earthmind_compat.backbones.granite import GraniteBackbone
from earthmind_compat.backbones.internvl import InternVLBackbone
from earthmind_compat.errors import unknown_name

#: Every backbone class of earthmind-compat, by registered name (``cls.spec.name``), in the order the
#: commands list them. Adding a backbone: its module, and its class here.
BACKBONE_CLASSES: dict[str, type[TokenBackbone]] = {
    cls.spec.name: cls for cls in (InternVLBackbone, GraniteBackbone, EarthMindBackbone)
}


def backbone_class(name: str) -> type[TokenBackbone]:
    """The backbone class registered as ``name``.

    Raises:
        UnknownNameError: for a name that is not one of ours, with the closest names.
    """
    if name not in BACKBONE_CLASSES:
        raise unknown_name("backbone", name, BACKBONE_CLASSES)
    return BACKBONE_CLASSES[name]


__all__ = [
    "BACKBONE_CLASSES",
    "BackboneSpec",
    "CheckpointLayout",
    "EarthMindBackbone",
    "GraniteBackbone",
    "InternVLBackbone",
    "TokenBackbone",
    "backbone_class",
]
