"""Necks TerraTorch lacks, registered in its ``NECK_REGISTRY``.

TerraTorch's own necks (``ReshapeTokensToImage``, ``SelectIndices``, ``LearnedInterpolateToPyramidal``...)
are used wherever they do the job; only what they cannot do lives here.
"""

from __future__ import annotations

#: Neck classes registered by :func:`earthmind_compat.registry.register_all`.
NECKS: tuple[type, ...] = ()
