"""Necks TerraTorch lacks, registered in its ``NECK_REGISTRY``.

TerraTorch's own necks (``SelectIndices``, ``LearnedInterpolateToPyramidal``, ``InterpolateToPyramidal``,
``AggregateTokens``...) are used wherever they do the job; only what they cannot do lives here:

- :class:`TokensToGrid` turns ``[B, N, C]`` tokens into ``[B, C, rows, cols]`` maps from the patch size and
  the image size, so it never guesses. TerraTorch's ``ReshapeTokensToImage`` guesses the grid from the
  token count: on 1.0.x it assumes a square grid and removes a CLS token whether or not there is one; on
  1.1+ it still reshapes e.g. the 10 tokens of a 2 x 5 grid into a wrong 3 x 3 map when told to remove a
  CLS token that is not there, and it fails on token streams of mixed resolution (InternVL's projector
  output next to the tower's tokens).
- :class:`ProjectChannels` maps every feature to a chosen width (wide LLM features, 1536 or 2048 channels,
  to a decoder's width) on tokens, maps or pooled vectors alike.

Both work with every TerraTorch call convention: ``neck(features)`` (1.0.x) and
``neck(features, image_size=...)`` (1.1+). They follow TerraTorch's neck contract (``channel_list`` first,
``process_channel_list``) without subclassing its ``Neck``: a ``custom_modules`` package is imported while
``terratorch.models.necks`` itself is still being imported, so that class cannot be imported from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from earthmind_compat.errors import ConfigurationError, InputError

#: Coarser token grids :class:`TokensToGrid` recognises, as divisors of the patch grid (token merging).
MERGED_GRID_FACTORS = (2, 4, 8)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _merge_factors(value: object, count: int) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigurationError(f"TokensToGrid merge_factors must be a list of positive integers, got {value!r}.")
    factors = [_positive_int("TokensToGrid merge_factors entry", factor) for factor in value]
    if len(factors) != count:
        raise ConfigurationError(
            f"TokensToGrid got {len(factors)} merge_factors {factors} for {count} features; give one per feature "
            "(backbone.merge_factors)."
        )
    return factors


class TokensToGrid(nn.Module):
    """Reshape ``[B, N, C]`` token tensors into ``[B, C, rows, cols]`` maps on the patch grid.

    The grid is ``image_size / patch_size`` (TerraTorch >= 1.1 passes ``image_size``; on 1.0.x, which does
    not, the grid must be square and is taken from the token count of the largest token feature, times its
    ``merge_factors`` entry when given). A token tensor must hold exactly
    ``rows * cols`` tokens, plus one leading CLS token when ``cls_token`` is true, or the tokens of a grid
    merged by 2, 4 or 8 in each direction (e.g. InternVL's pixel-shuffled projector output, never with a
    CLS token). Anything else raises :class:`InputError` naming the expected counts. Maps (4-D) pass through.

    Args:
        channel_list: Channels of each input feature (filled in by TerraTorch).
        patch_size: Side of one patch in pixels (``backbone.patch_size``).
        cls_token: Whether full-resolution token tensors start with a CLS token
            (``backbone.has_cls_token``); it is dropped.
        resize_to_grid: Upsample merged (coarser) grids to the patch grid (nearest), so every output map
            has the same size; with False they keep their own size.
        merge_factors: Optional, one per input feature: how many patches per side one of its tokens covers
            (1 on the tower's layers, 2 on InternVL's projector and the language layers; ``backbone.merge_factors``).
            Only read without ``image_size`` (TerraTorch 1.0.x), where it places a merged feature on the patch
            grid even when no full-resolution feature is selected; without it, such a feature is read as the
            patch grid itself.
    """

    def __init__(
        self,
        channel_list: list[int],
        patch_size: int,
        cls_token: bool = False,
        resize_to_grid: bool = True,
        merge_factors: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.channel_list = list(channel_list)
        self.patch_size = _positive_int("TokensToGrid patch_size", patch_size)
        if not isinstance(cls_token, bool):
            raise ConfigurationError(f"TokensToGrid cls_token must be true or false, got {cls_token!r}.")
        self.cls_token = cls_token
        self.resize_to_grid = bool(resize_to_grid)
        self.merge_factors = _merge_factors(merge_factors, len(self.channel_list))

    def process_channel_list(self, channel_list: list[int]) -> list[int]:
        """Reshaping keeps every feature's channels."""
        return list(channel_list)

    def forward(
        self, features: list[torch.Tensor], image_size: Sequence[int] | None = None, **kwargs: object
    ) -> list[torch.Tensor]:
        """Reshape every 3-D feature; 4-D maps are returned unchanged.

        Args:
            features: Backbone outputs, ``[B, N, C]`` tokens or ``[B, C, H, W]`` maps.
            image_size: ``(H, W)`` of the image the backbone saw (after TerraTorch's padding).
            **kwargs: Other keywords TerraTorch passes (ignored).

        Returns:
            One ``[B, C, rows, cols]`` map per feature.
        """
        if self.merge_factors is not None and len(self.merge_factors) != len(features):
            raise InputError(
                f"TokensToGrid got {len(features)} features but {len(self.merge_factors)} merge_factors "
                f"{self.merge_factors}; give one factor per backbone feature (backbone.merge_factors) and put "
                "TokensToGrid first in the neck chain."
            )
        rows, cols = self._grid(features, image_size)
        out = []
        for index, feature in enumerate(features):
            if feature.ndim == 4:
                out.append(feature)
            elif feature.ndim == 3:
                out.append(self._to_map(feature, index, rows, cols))
            else:
                raise InputError(
                    f"TokensToGrid expects [B, N, C] tokens or [B, C, H, W] maps, got feature {index} of shape "
                    f"{tuple(feature.shape)}."
                )
        return out

    def _grid(self, features: list[torch.Tensor], image_size: Sequence[int] | None) -> tuple[int, int]:
        p = self.patch_size
        if image_size is not None:
            height, width = (int(s) for s in tuple(image_size)[-2:])
            if height % p or width % p:
                raise InputError(
                    f"TokensToGrid got image size {height}x{width}, not a multiple of patch_size={p}. Check that "
                    "patch_size equals backbone.patch_size and keep TerraTorch's padding on (backbone_padding)."
                )
            return height // p, width // p
        factors = self.merge_factors or [1] * len(features)
        tokens = [(f, factor) for f, factor in zip(features, factors, strict=True) if f.ndim == 3]
        if not tokens:
            return 0, 0
        # the patch grid is read from the largest token set: features merged by a projector (e.g. InternVL's pixel
        # shuffle) hold fewer tokens and are placed on it by _to_map; a merged one (never with a CLS token) is
        # scaled up by its merge factor
        reference, factor = max(tokens, key=lambda pair: pair[0].shape[1])
        cls = int(self.cls_token) if factor == 1 else 0
        count = reference.shape[1] - cls
        side = math.isqrt(max(count, 0))
        if side * side != count or count == 0:
            raise InputError(
                f"TokensToGrid got {reference.shape[1]} tokens and no image_size: TerraTorch < 1.1 does not pass "
                "the image size to necks, so only square token grids can be reshaped"
                f"{' (after removing the CLS token)' if cls else ''}. Use square images or TerraTorch >= 1.1."
            )
        return side * factor, side * factor

    def _to_map(self, tokens: torch.Tensor, index: int, rows: int, cols: int) -> torch.Tensor:
        count = tokens.shape[1]
        cls = int(self.cls_token)
        full = rows * cols
        if count == full + 1 and not self.cls_token:
            raise InputError(
                f"Feature {index} has {count} tokens, one more than the {rows}x{cols} patch grid: the backbone "
                "returns a CLS token. Build TokensToGrid with cls_token: true (backbone.has_cls_token)."
            )
        if count == full and self.cls_token:
            raise InputError(
                f"Feature {index} has {count} tokens, exactly the {rows}x{cols} patch grid, but cls_token is true: "
                "removing a token would shift every row. Build TokensToGrid with cls_token: false."
            )
        if count == full + cls:
            return self._reshape(tokens[:, cls:], rows, cols, rows, cols)
        for factor in MERGED_GRID_FACTORS:
            if rows % factor or cols % factor:
                continue
            merged_rows, merged_cols = rows // factor, cols // factor
            merged = merged_rows * merged_cols
            if count in (merged, merged + cls):
                return self._reshape(tokens[:, count - merged :], merged_rows, merged_cols, rows, cols)
        raise InputError(
            f"Feature {index} has {count} tokens, which fits neither the {rows}x{cols} grid of "
            f"{self.patch_size}-pixel patches ({full}{' + 1 CLS' if cls else ''} tokens) nor a grid merged by "
            f"{', '.join(map(str, MERGED_GRID_FACTORS))}. Check patch_size (backbone.patch_size) and cls_token "
            "(backbone.has_cls_token)."
        )

    def _reshape(self, tokens: torch.Tensor, rows: int, cols: int, grid_rows: int, grid_cols: int) -> torch.Tensor:
        batch, _, channels = tokens.shape
        maps = tokens.transpose(1, 2).reshape(batch, channels, rows, cols)
        if self.resize_to_grid and (rows, cols) != (grid_rows, grid_cols):
            maps = F.interpolate(maps, size=(grid_rows, grid_cols), mode="nearest")
        return maps


class ProjectChannels(nn.Module):
    """Project every feature to a chosen number of channels with a learned linear map.

    Works on ``[B, N, C]`` tokens, ``[B, C, H, W]`` maps (a 1 x 1 convolution) and ``[B, C]`` vectors, so it
    can sit before or after :class:`TokensToGrid`.

    Args:
        channel_list: Channels of each input feature (filled in by TerraTorch).
        out_channels: One width for every feature, or one width per feature.
        bias: Whether the projections have a bias.
    """

    def __init__(self, channel_list: list[int], out_channels: int | Sequence[int], bias: bool = True) -> None:
        super().__init__()
        self.channel_list = list(channel_list)
        if isinstance(out_channels, int) and not isinstance(out_channels, bool):
            widths = [out_channels] * len(channel_list)
        elif isinstance(out_channels, Sequence) and not isinstance(out_channels, str):
            widths = list(out_channels)
            if len(widths) != len(channel_list):
                raise ConfigurationError(
                    f"ProjectChannels got {len(widths)} out_channels {widths} for {len(channel_list)} features "
                    f"{list(channel_list)}; give one width per feature or a single width for all."
                )
        else:
            raise ConfigurationError(
                f"ProjectChannels out_channels must be an int or a list of ints, got {out_channels!r}."
            )
        self.out_widths = [_positive_int("ProjectChannels out_channels", w) for w in widths]
        self.in_widths = [_positive_int("ProjectChannels input channels", c) for c in channel_list]
        self.projections = nn.ModuleList(
            nn.Linear(c_in, c_out, bias=bias) for c_in, c_out in zip(self.in_widths, self.out_widths, strict=True)
        )

    def process_channel_list(self, channel_list: list[int]) -> list[int]:
        """Every feature gets its projected width."""
        return list(self.out_widths)

    def forward(self, features: list[torch.Tensor], **kwargs: object) -> list[torch.Tensor]:
        """Project each feature; maps are projected along their channel axis.

        Args:
            features: ``[B, N, C]``, ``[B, C, H, W]`` or ``[B, C]`` tensors, one per input channel entry.
            **kwargs: Keywords TerraTorch passes (ignored).

        Returns:
            The same kinds of tensors with the projected channel counts.
        """
        if len(features) != len(self.projections):
            raise InputError(f"ProjectChannels was built for {len(self.projections)} features but got {len(features)}.")
        out = []
        for index, (feature, projection) in enumerate(zip(features, self.projections, strict=True)):
            axis = 1 if feature.ndim == 4 else -1
            if feature.shape[axis] != projection.in_features:
                raise InputError(
                    f"ProjectChannels feature {index} has {feature.shape[axis]} channels, expected "
                    f"{projection.in_features} (shape {tuple(feature.shape)})."
                )
            if feature.ndim == 4:
                out.append(projection(feature.movedim(1, -1)).movedim(-1, 1))
            else:
                out.append(projection(feature))
        return out


#: Neck classes registered by :func:`earthmind_compat.registry.register_all`.
NECKS: tuple[type, ...] = (TokensToGrid, ProjectChannels)
