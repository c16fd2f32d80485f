"""Multi-sensor input for EarthMind: which modalities a backbone takes and how a batch carries them.

Two input conventions reach the same model:

* a dict of modalities, ``{"S1GRD": [B, 2, H, W], "S2L2A": [B, 4, H, W]}``, as TerraTorch's multimodal
  datamodules yield it (and as TerraMind takes it); the keys are the names given in ``modalities``;
* one stacked tensor ``[B, C, H, W]`` from a plain datamodule, split into modalities by band name
  (when ``bands`` gives the stacked order) or by position (modality blocks in the order of ``modalities``).

``modalities`` maps each modality name to its band names or its band count, main image first:
EarthMind takes SAR as its main image and optical as the auxiliary one. ``None`` means one sensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from earthmind_compat.backbones.base import check_image
from earthmind_compat.bands import resolve_bands
from earthmind_compat.errors import ConfigurationError, InputError

#: Name of the only modality of a single-sensor backbone built without ``modalities``.
SINGLE_MODALITY = "image"
#: EarthMind's gating pairs two modalities; more cannot be fused by it.
MAX_MODALITIES = 2


@dataclass(frozen=True)
class Modality:
    """One sensor: its name (the dict key of a batch), band count and band names (or ``None``)."""

    name: str
    channels: int
    bands: list[str] | None


def _modality(name: object, spec: object) -> Modality:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"Modality names must be non-empty strings, got {name!r}.")
    if isinstance(spec, int) and not isinstance(spec, bool):
        channels, bands = resolve_bands(spec, None)
    elif isinstance(spec, Sequence) and not isinstance(spec, str):
        channels, bands = resolve_bands(None, spec)
    else:
        raise ConfigurationError(
            f"Modality {name!r} must map to its band names or its band count, got {spec!r}; e.g. "
            "modalities={'S1GRD': ['VV', 'VH'], 'S2L2A': ['BLUE', 'GREEN', 'RED']}."
        )
    return Modality(name, channels, bands)


@dataclass
class ModalityLayout:
    """The modalities of a backbone and where each one sits in a stacked input tensor.

    Attributes:
        modalities: Main modality first.
        in_chans: Channels of a stacked input (sum over modalities).
        bands: Band names of a stacked input in order, or ``None`` when some modality is unnamed.
        channel_index: For each modality, its channel positions in a stacked input.
    """

    modalities: list[Modality]
    in_chans: int
    bands: list[str] | None
    channel_index: list[list[int]]

    @property
    def names(self) -> list[str]:
        """Modality names, main first."""
        return [m.name for m in self.modalities]

    @property
    def fused(self) -> bool:
        """Whether two modalities are fused (otherwise the single-sensor path)."""
        return len(self.modalities) == MAX_MODALITIES

    def split(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a stacked ``[B, in_chans, H, W]`` tensor into ``{modality: [B, channels, H, W]}``."""
        out = {}
        for modality, index in zip(self.modalities, self.channel_index, strict=True):
            start = index[0]
            if index == list(range(start, start + len(index))):
                out[modality.name] = x[:, start : start + len(index)]
            else:
                out[modality.name] = x[:, torch.tensor(index, device=x.device)]
        return out

    def check_dict(
        self, inputs: Mapping[str, object], patch_size: int, device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """Check a dict of modalities and return it with our modality order.

        Args:
            inputs: ``{modality: [B, C_m, H, W]}``.
            patch_size: The backbone's patch size.
            device: The backbone's device (``None``: any).

        Raises:
            InputError: for a missing or unexpected modality (naming the fix), a tensor of the wrong
                type, shape, band count, dtype or size, or modalities of different sizes.
        """
        expected, given = set(self.names), set(inputs)
        if expected != given:
            missing, unexpected = sorted(expected - given), sorted(given - expected)
            parts = [f"missing {missing}"] if missing else []
            parts += [f"unexpected {unexpected}"] if unexpected else []
            hint = ""
            if missing and not unexpected and len(given) == 1:
                hint = (
                    f" For single-sensor input (EarthMind's single-image path) build the backbone with "
                    f"modalities={{{self._spec_of(given)}}}."
                )
            raise InputError(
                f"The input modalities {sorted(given)} do not match the backbone's {self.names}: "
                f"{'; '.join(parts)}. Pass a dict with exactly the keys {self.names}.{hint}"
            )
        checked = {}
        for modality in self.modalities:
            checked[modality.name] = check_image(
                inputs[modality.name], modality.channels, patch_size, device=device, modality=modality.name
            )
        sizes = {name: tuple(x.shape[-2:]) for name, x in checked.items()}
        if len(set(sizes.values())) > 1:
            raise InputError(
                f"The modalities have different image sizes {sizes}; EarthMind gates tokens position by position, "
                "so resample them to one grid (same height and width) in the datamodule."
            )
        batches = {name: x.shape[0] for name, x in checked.items()}
        if len(set(batches.values())) > 1:
            raise InputError(f"The modalities have different batch sizes {batches}; stack the same samples.")
        return checked

    def _spec_of(self, given: set[str]) -> str:
        name = next(iter(given))
        for modality in self.modalities:
            if modality.name == name:
                return f"{name!r}: {modality.bands or modality.channels}"
        return f"{name!r}: <bands>"


def _blocks(modalities: Sequence[Modality]) -> list[list[int]]:
    """Channel positions of each modality in a stacked input whose blocks follow the modalities' order."""
    index, start = [], 0
    for m in modalities:
        index.append(list(range(start, start + m.channels)))
        start += m.channels
    return index


def resolve_modalities(
    modalities: Mapping[str, object] | None, in_chans: int | None, bands: Sequence[object] | None
) -> ModalityLayout:
    """Reconcile ``modalities``, ``in_chans`` and ``bands`` into a :class:`ModalityLayout`.

    Args:
        modalities: ``{name: band names or band count}``, main modality first, at most two; ``None`` for a
            single sensor described by ``in_chans`` / ``bands`` alone.
        in_chans: Channels of a stacked input; must equal the sum over modalities if both are given.
        bands: Band names of a stacked input in order. With named modalities they must be exactly the
            modalities' bands (in any order); otherwise only their number must match.

    Raises:
        ConfigurationError: naming the inconsistency and how to fix it.
    """
    if modalities is None:
        channels, names = resolve_bands(in_chans, bands)
        return ModalityLayout([Modality(SINGLE_MODALITY, channels, names)], channels, names, [list(range(channels))])
    if isinstance(modalities, str) or not isinstance(modalities, Mapping):
        raise ConfigurationError(
            f"modalities must map each modality to its bands or band count, got {modalities!r}; e.g. "
            "modalities={'S1GRD': ['VV', 'VH'], 'S2L2A': ['BLUE', 'GREEN', 'RED']} (SAR first, then optical)."
        )
    if not 1 <= len(modalities) <= MAX_MODALITIES:
        raise ConfigurationError(
            f"EarthMind fuses one or two modalities (SAR and optical), got {len(modalities)}: {list(modalities)}. "
            "Stack extra optical bands into the optical modality instead."
        )
    parsed = [_modality(name, spec) for name, spec in modalities.items()]
    total = sum(m.channels for m in parsed)
    if in_chans is not None and in_chans != total:
        raise ConfigurationError(
            f"in_chans={in_chans} disagrees with the {total} bands of modalities {list(modalities)}; "
            "leave in_chans unset or make it the sum of the modalities' bands."
        )
    all_named = all(m.bands is not None for m in parsed)
    union = [b for m in parsed for b in (m.bands or [])]
    shared = sorted({b for b in union if union.count(b) > 1})
    if shared:
        raise ConfigurationError(
            f"Modalities {list(modalities)} share band names {shared}; each band belongs to one sensor. Rename "
            "them per sensor (e.g. S1_VV, S2_RED), or give a modality its band count instead of names."
        )
    if bands is None:
        return ModalityLayout(parsed, total, union if all_named else None, _blocks(parsed))
    _, stacked = resolve_bands(None, bands)
    if not all_named:
        if len(stacked) != total:
            raise ConfigurationError(
                f"bands lists {len(stacked)} bands but the modalities have {total}; give one name per stacked band."
            )
        return ModalityLayout(parsed, total, stacked, _blocks(parsed))
    if sorted(stacked) != sorted(union):
        raise ConfigurationError(
            f"bands {stacked} must be exactly the modalities' bands {union} (in any order): "
            f"missing {sorted(set(union) - set(stacked))}, extra {sorted(set(stacked) - set(union))}."
        )
    index = [[stacked.index(b) for b in m.bands] for m in parsed]
    return ModalityLayout(parsed, total, stacked, index)
