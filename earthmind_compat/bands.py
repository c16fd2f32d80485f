"""Input bands: resolve ``in_chans`` / ``bands`` and adapt RGB patch weights to other band sets.

Rule for extra bands (used when pretrained RGB weights meet a different band set): a band named
``RED``, ``GREEN`` or ``BLUE`` keeps the kernel the pretrained model learned for that colour; every other
band gets the mean of the three RGB kernels. The whole kernel is then scaled by ``3 / n_bands`` so that the
expected activation of the patch embedding stays that of the RGB model when all bands carry similar
signal. Without band names, the RGB kernels are cycled (band ``i`` takes RGB kernel ``i % 3``) before the
same scaling, as timm does for unnamed channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch

from earthmind_compat.errors import ConfigurationError

RGB_ORDER = ("RED", "GREEN", "BLUE")


def band_name(band: object) -> str:
    """Return the canonical upper-case name of a band given as a string or an enum member.

    Args:
        band: A band name such as ``"red"`` or a TerraTorch ``HLSBands`` member.

    Returns:
        The upper-case name, e.g. ``"RED"``.
    """
    if isinstance(band, Enum):
        band = band.value if isinstance(band.value, str) else band.name
    if not isinstance(band, str) or not band:
        raise ConfigurationError(f"Band names must be non-empty strings, got {band!r}.")
    return band.upper()


def resolve_bands(in_chans: int | None, bands: Sequence[object] | None) -> tuple[int, list[str] | None]:
    """Reconcile ``in_chans`` and ``bands`` into a channel count and an optional list of band names.

    Args:
        in_chans: Number of input channels, or ``None``.
        bands: Band names, or ``None``.

    Returns:
        ``(in_chans, band_names)``. Defaults to 3 unnamed channels when neither is given.

    Raises:
        ConfigurationError: if the two disagree, a count is not positive or names repeat.
    """
    names = None
    if bands is not None:
        if isinstance(bands, str):
            raise ConfigurationError(f"bands must be a list of names, got the string {bands!r}; write [{bands!r}].")
        names = [band_name(b) for b in bands]
        if not names:
            raise ConfigurationError("bands is empty; give at least one band name or leave it unset.")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigurationError(f"bands repeats {duplicates}; each band may appear once.")
    if in_chans is not None:
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
            raise ConfigurationError(f"in_chans must be a positive integer, got {in_chans!r}.")
        if names is not None and len(names) != in_chans:
            raise ConfigurationError(
                f"in_chans={in_chans} disagrees with the {len(names)} bands {names}; "
                "give only one of them or make them agree."
            )
        return in_chans, names
    if names is not None:
        return len(names), names
    return 3, None


def adapt_patch_weight(rgb_weight: torch.Tensor, in_chans: int, bands: Sequence[str] | None) -> torch.Tensor:
    """Turn a patch-embedding kernel learned on RGB into one for ``in_chans`` bands.

    Args:
        rgb_weight: Kernel of shape ``[out, 3, kh, kw]`` in RED, GREEN, BLUE order, as the pretrained
            model saw them (InternViT takes RGB).
        in_chans: Number of bands of the new input.
        bands: Their names, or ``None`` (then kernels are cycled).

    Returns:
        A kernel of shape ``[out, in_chans, kh, kw]`` built by the rule in the module docstring.
    """
    if rgb_weight.ndim != 4 or rgb_weight.shape[1] != 3:
        raise ConfigurationError(
            f"Expected an RGB patch kernel of shape [out, 3, kh, kw], got {tuple(rgb_weight.shape)}."
        )
    if bands is None and in_chans == 3:
        return rgb_weight.clone()
    mean_kernel = rgb_weight.mean(dim=1)
    columns = []
    for i in range(in_chans):
        if bands is None:
            columns.append(rgb_weight[:, i % 3])
        elif bands[i] in RGB_ORDER:
            columns.append(rgb_weight[:, RGB_ORDER.index(bands[i])])
        else:
            columns.append(mean_kernel)
    return torch.stack(columns, dim=1) * (3.0 / in_chans)
