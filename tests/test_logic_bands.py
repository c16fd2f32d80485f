"""Pure logic of earthmind_compat.bands: band names, in_chans / bands reconciliation, RGB kernel adaptation.

Kernels are checked column by column against the rule written out by hand (RGB column, mean of the three, or
cycled, times 3 / n_bands), on a kernel whose every entry is distinct.
"""

from __future__ import annotations

from enum import Enum

import pytest
import torch

from earthmind_compat.bands import adapt_patch_weight, band_name, resolve_bands
from earthmind_compat.errors import ConfigurationError


class _Named(Enum):
    RED_EDGE = "red_edge"  # a string value wins over the member name
    SWIR_1 = 6  # no string value: the member name is used
    EMPTY = ""


# -- band_name ------------------------------------------------------------------------------------------------


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("band", "expected"),
    [("red", "RED"), ("Nir", "NIR"), ("B08", "B08"), (_Named.RED_EDGE, "RED_EDGE"), (_Named.SWIR_1, "SWIR_1")],
)
def test_band_name_is_the_upper_case_name(band: object, expected: str) -> None:
    assert band_name(band) == expected


@pytest.mark.reliability
def test_band_name_prefers_an_enum_string_value_to_the_member_name() -> None:
    class Bands(Enum):
        FIRST = "green"

    assert band_name(Bands.FIRST) == "GREEN"


@pytest.mark.reliability
@pytest.mark.parametrize("band", ["", 3, None, _Named.EMPTY, b"red"])
def test_band_name_refuses_non_strings_and_empty_names(band: object) -> None:
    shown = repr("" if band is _Named.EMPTY else band)
    with pytest.raises(ConfigurationError, match=r"^Band names must be non-empty strings, got ") as info:
        band_name(band)
    assert str(info.value).endswith(f"got {shown}.")


# -- resolve_bands --------------------------------------------------------------------------------------------


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("in_chans", "bands", "expected"),
    [
        (None, None, (3, None)),
        (1, None, (1, None)),
        (4, None, (4, None)),
        (None, ["red", "green"], (2, ["RED", "GREEN"])),
        (None, ("nir",), (1, ["NIR"])),
        (2, ["red", "nir"], (2, ["RED", "NIR"])),
        (3, [_Named.RED_EDGE, "blue", _Named.SWIR_1], (3, ["RED_EDGE", "BLUE", "SWIR_1"])),
    ],
)
def test_resolve_bands(in_chans: object, bands: object, expected: tuple) -> None:
    result = resolve_bands(in_chans, bands)
    assert result == expected
    assert isinstance(result, tuple)
    if expected[1] is not None:
        assert type(result[1]) is list


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("in_chans", "bands", "message"),
    [
        (None, "red", r"^bands must be a list of names, got the string 'red'; write \['red'\]\.$"),
        (3, "rgb", r"^bands must be a list of names, got the string 'rgb'"),
        (None, [], r"^bands is empty; give at least one band name or leave it unset\.$"),
        (
            None,
            ["red", "nir", "RED", "nir", "green"],
            r"^bands repeats \['NIR', 'RED'\]; each band may appear once\.$",
        ),
        (0, None, r"^in_chans must be a positive integer, got 0\.$"),
        (-2, None, r"^in_chans must be a positive integer, got -2\.$"),
        (True, None, r"^in_chans must be a positive integer, got True\.$"),
        (False, ["red"], r"^in_chans must be a positive integer, got False\.$"),
        (3.0, None, r"^in_chans must be a positive integer, got 3\.0\.$"),
        ("3", None, r"^in_chans must be a positive integer, got '3'\.$"),
        (
            3,
            ["red", "green"],
            r"^in_chans=3 disagrees with the 2 bands \['RED', 'GREEN'\]; give only one of them or make them agree\.$",
        ),
        (1, ["red", "green"], r"^in_chans=1 disagrees with the 2 bands"),
    ],
)
def test_resolve_bands_refuses_contradictions(in_chans: object, bands: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        resolve_bands(in_chans, bands)


# -- adapt_patch_weight ---------------------------------------------------------------------------------------


def _kernel(out: int = 2, kh: int = 2, kw: int = 3) -> torch.Tensor:
    """An RGB kernel [out, 3, kh, kw] whose entries are all different (so any wrong column shows)."""
    return torch.arange(out * 3 * kh * kw, dtype=torch.float64).reshape(out, 3, kh, kw) ** 1.5


@pytest.mark.numerics
def test_three_unnamed_bands_copy_the_kernel() -> None:
    rgb = _kernel()
    out = adapt_patch_weight(rgb, 3, None)
    assert torch.equal(out, rgb)
    out.add_(1.0)  # a copy: changing it leaves the pretrained kernel alone
    assert torch.equal(rgb, _kernel())


@pytest.mark.numerics
@pytest.mark.parametrize("in_chans", [1, 2, 4, 5, 7])
def test_unnamed_bands_cycle_the_rgb_kernels(in_chans: int) -> None:
    rgb = _kernel()
    out = adapt_patch_weight(rgb, in_chans, None)
    assert out.shape == (2, in_chans, 2, 3)
    for i in range(in_chans):
        torch.testing.assert_close(out[:, i], rgb[:, i % 3] * 3.0 / in_chans)


@pytest.mark.numerics
def test_named_bands_keep_their_colour_and_others_take_the_mean() -> None:
    rgb = _kernel()
    red, green, blue = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    mean = (red + green + blue) / 3.0
    out = adapt_patch_weight(rgb, 5, ["NIR", "BLUE", "RED", "SWIR_1", "GREEN"])
    expected = torch.stack([mean, blue, red, mean, green], dim=1) * (3.0 / 5.0)
    torch.testing.assert_close(out, expected)


@pytest.mark.numerics
def test_three_named_bands_in_another_order_are_reordered_not_copied() -> None:
    rgb = _kernel()
    out = adapt_patch_weight(rgb, 3, ["BLUE", "NIR", "RED"])
    mean = rgb.sum(dim=1) / 3.0
    torch.testing.assert_close(out, torch.stack([rgb[:, 2], mean, rgb[:, 0]], dim=1))


@pytest.mark.numerics
def test_a_single_named_band_is_scaled_by_three() -> None:
    rgb = _kernel()
    torch.testing.assert_close(adapt_patch_weight(rgb, 1, ["GREEN"]), rgb[:, 1:2] * 3.0)


@pytest.mark.reliability
@pytest.mark.parametrize("shape", [(4, 3, 2), (4, 3, 2, 2, 1), (4, 4, 2, 2), (4, 1, 2, 2)])
def test_adapt_patch_weight_refuses_a_kernel_that_is_not_rgb(shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigurationError) as info:
        adapt_patch_weight(torch.zeros(shape), 4, None)
    assert str(info.value) == f"Expected an RGB patch kernel of shape [out, 3, kh, kw], got {shape}."
