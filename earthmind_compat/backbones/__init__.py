"""Backbone constructors, one per registered name.

Each constructor is a plain function whose ``__name__`` is the name TerraTorch registers.
"""

from __future__ import annotations

from collections.abc import Callable

from earthmind_compat.backbones.earthmind import EarthMindBackbone
from earthmind_compat.backbones.granite import GraniteBackbone
from earthmind_compat.backbones.internvl import InternVLBackbone


def internvl2_5_4b(**kwargs: object) -> InternVLBackbone:
    """InternVL2.5-4B's vision tower (InternViT-300M-448px-V2.5); see :class:`InternVLBackbone`."""
    return InternVLBackbone(**kwargs)


def earthmind_v1(**kwargs: object) -> EarthMindBackbone:
    """EarthMind-4B's image side: InternViT, projector and SAR/optical gating; see :class:`EarthMindBackbone`."""
    return EarthMindBackbone(**kwargs)


def granite_4_tiny(**kwargs: object) -> GraniteBackbone:
    """Granite 4.0 H Tiny as an image encoder; see :class:`GraniteBackbone`."""
    return GraniteBackbone(**kwargs)


#: Every backbone earthmind-compat declares, by registered name.
BACKBONE_BUILDERS: dict[str, Callable] = {
    "internvl2_5_4b": internvl2_5_4b,
    "granite_4_tiny": granite_4_tiny,
    "earthmind_v1": earthmind_v1,
}

#: Whether each backbone's token tensors start with a CLS token at its default settings.
CLS_TOKEN_BY_DEFAULT: dict[str, bool] = {"internvl2_5_4b": True, "granite_4_tiny": False, "earthmind_v1": False}

__all__ = [
    "BACKBONE_BUILDERS",
    "CLS_TOKEN_BY_DEFAULT",
    "EarthMindBackbone",
    "GraniteBackbone",
    "InternVLBackbone",
    "earthmind_v1",
    "granite_4_tiny",
    "internvl2_5_4b",
]
