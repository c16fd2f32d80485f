"""Pure logic of earthmind_compat.necks beyond tests/test_necks.py: exact grids, token tails and messages.

Tokens are numbered (token ``i`` of batch ``b`` carries ``i + 1000 b`` in channel 0 and ``i + 100 c`` in
channel ``c``), so where every token lands is checked against raster order written out by hand.
"""

from __future__ import annotations

import pytest
import torch

from earthmind_compat.errors import ConfigurationError, InputError
from earthmind_compat.necks import ProjectChannels, TokensToGrid


def numbered(batch: int, count: int, channels: int) -> torch.Tensor:
    index = torch.arange(count, dtype=torch.float32)
    return torch.stack(
        [torch.stack([index + 1000 * b + 100 * c for c in range(channels)], dim=-1) for b in range(batch)]
    )


def raster(rows: int, cols: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + rows * cols, dtype=torch.float32).reshape(rows, cols)


# -- TokensToGrid: construction -------------------------------------------------------------------------------


@pytest.mark.reliability
@pytest.mark.parametrize("patch_size", [0, -14, 14.0, "14", True, None])
def test_patch_size_must_be_a_positive_integer(patch_size: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        TokensToGrid([4], patch_size=patch_size)
    assert str(info.value) == f"TokensToGrid patch_size must be a positive integer, got {patch_size!r}."


@pytest.mark.reliability
@pytest.mark.parametrize("cls_token", ["yes", 1, None])
def test_cls_token_must_be_a_boolean(cls_token: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        TokensToGrid([4], patch_size=14, cls_token=cls_token)
    assert str(info.value) == f"TokensToGrid cls_token must be true or false, got {cls_token!r}."


@pytest.mark.shapes
def test_attributes_and_channel_list() -> None:
    channels = [4, 6]
    neck = TokensToGrid(channels, patch_size=1, cls_token=True, resize_to_grid=0)
    assert (neck.patch_size, neck.cls_token, neck.resize_to_grid) == (1, True, False)
    assert neck.channel_list == [4, 6] and neck.channel_list is not channels
    predicted = neck.process_channel_list(channels)
    assert predicted == [4, 6] and predicted is not channels
    assert TokensToGrid([4], patch_size=14).resize_to_grid is True
    assert TokensToGrid([4], patch_size=14).cls_token is False


# -- TokensToGrid: grids --------------------------------------------------------------------------------------


@pytest.mark.shapes
def test_image_size_may_carry_leading_dimensions() -> None:
    neck = TokensToGrid([2], patch_size=4)
    (grid,) = neck([numbered(1, 6, 2)], image_size=torch.Size([1, 3, 8, 12]))
    assert torch.equal(grid[0, 0], raster(2, 3))
    assert torch.equal(grid[0, 1], raster(2, 3, 100))


@pytest.mark.shapes
@pytest.mark.parametrize(("image_size", "shown"), [((56, 50), "56x50"), ((50, 56), "50x56")])
def test_an_image_size_off_the_patch_grid_is_refused(image_size: tuple, shown: str) -> None:
    with pytest.raises(InputError) as info:
        TokensToGrid([4], patch_size=14)([numbered(1, 16, 4)], image_size=image_size)
    assert str(info.value) == (
        f"TokensToGrid got image size {shown}, not a multiple of patch_size=14. Check that patch_size equals "
        "backbone.patch_size and keep TerraTorch's padding on (backbone_padding)."
    )


@pytest.mark.shapes
def test_without_image_size_maps_only_pass_through() -> None:
    maps = torch.randn(1, 4, 2, 2)
    assert TokensToGrid([4], patch_size=14)([maps])[0] is maps


@pytest.mark.shapes
@pytest.mark.parametrize(("count", "cls_token", "side"), [(9, False, 3), (10, True, 3), (1, False, 1), (2, True, 1)])
def test_without_image_size_a_square_grid_is_read_from_the_count(count: int, cls_token: bool, side: int) -> None:
    (grid,) = TokensToGrid([1], patch_size=14, cls_token=cls_token)([numbered(1, count, 1)])
    assert torch.equal(grid[0, 0], raster(side, side, int(cls_token)))


@pytest.mark.shapes
@pytest.mark.parametrize(("count", "cls_token"), [(8, False), (9, True), (0, False), (1, True), (3, False)])
def test_without_image_size_other_counts_are_refused(count: int, cls_token: bool) -> None:
    with pytest.raises(InputError) as info:
        TokensToGrid([1], patch_size=14, cls_token=cls_token)([numbered(1, count, 1)])
    removing = " (after removing the CLS token)" if cls_token else ""
    assert str(info.value) == (
        f"TokensToGrid got {count} tokens and no image_size: TerraTorch < 1.1 does not pass the image size to "
        f"necks, so only square token grids can be reshaped{removing}. Use square images or TerraTorch >= 1.1."
    )


@pytest.mark.shapes
def test_without_image_size_the_largest_token_feature_is_the_patch_grid() -> None:
    """A merged feature first (2x2, as after a projector's pixel shuffle), the patch grid (4x4) second."""
    merged, grid = TokensToGrid([1, 1], patch_size=14)([numbered(1, 4, 1), numbered(1, 16, 1)])
    assert torch.equal(grid[0, 0], raster(4, 4))
    assert merged.shape == (1, 1, 4, 4)  # placed on the patch grid (resize_to_grid), not read as the grid itself
    assert torch.equal(merged[0, 0, ::2, ::2], raster(2, 2))


@pytest.mark.shapes
@pytest.mark.parametrize("cls_token", [False, True])
def test_without_image_size_merge_factors_place_merged_only_features_as_the_image_size_does(cls_token: bool) -> None:
    """Only merged features selected (InternVL's projector, the language layers): TerraTorch 1.0 gives maps of the
    size TerraTorch >= 1.1 gives from the image size, the 4x4 patch grid, not the 2x2 merged grid itself."""
    neck = TokensToGrid([1, 1], patch_size=14, cls_token=cls_token, merge_factors=[2, 2])
    features = [numbered(2, 4, 1), numbered(2, 4, 1) + 0.5]
    without = neck(features)
    with_size = neck(features, image_size=(56, 56))
    assert [m.shape for m in without] == [torch.Size([2, 1, 4, 4])] * 2
    for a, b in zip(without, with_size, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(without[0][1, 0, ::2, ::2], raster(2, 2, 1000))


@pytest.mark.shapes
def test_without_image_size_merge_factors_leave_the_patch_grid_to_a_full_resolution_feature() -> None:
    neck = TokensToGrid([1, 1], patch_size=14, cls_token=True, merge_factors=[1, 2])
    grid, merged = neck([numbered(1, 17, 1), numbered(1, 4, 1)])
    assert torch.equal(grid[0, 0], raster(4, 4, 1))
    assert merged.shape == (1, 1, 4, 4)


@pytest.mark.shapes
def test_without_image_size_a_merged_feature_needs_its_factor_when_cls_token_is_true() -> None:
    """4 tokens, no CLS: the projector's 2x2 grid, which cannot be read as a patch grid with a CLS token."""
    with pytest.raises(InputError, match=r"TokensToGrid got 4 tokens and no image_size"):
        TokensToGrid([1], patch_size=14, cls_token=True)([numbered(1, 4, 1)])


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("merge_factors", "message"),
    [
        ("2", "TokensToGrid merge_factors must be a list of positive integers, got '2'."),
        (2, "TokensToGrid merge_factors must be a list of positive integers, got 2."),
        ([1, 0], "TokensToGrid merge_factors entry must be a positive integer, got 0."),
        ([1, True], "TokensToGrid merge_factors entry must be a positive integer, got True."),
        ([1], "TokensToGrid got 1 merge_factors [1] for 2 features; give one per feature (backbone.merge_factors)."),
    ],
)
def test_merge_factors_are_checked_when_built(merge_factors: object, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        TokensToGrid([1, 1], patch_size=14, merge_factors=merge_factors)
    assert str(info.value) == message


@pytest.mark.reliability
def test_merge_factors_must_match_the_features_it_gets() -> None:
    """E.g. after a SelectIndices that TerraTorch ran first: the factors no longer line up with the features."""
    neck = TokensToGrid([1, 1, 1], patch_size=14, merge_factors=[1, 1, 2])
    with pytest.raises(InputError) as info:
        neck([numbered(1, 16, 1), numbered(1, 4, 1)], image_size=(56, 56))
    assert str(info.value) == (
        "TokensToGrid got 2 features but 3 merge_factors [1, 1, 2]; give one factor per backbone feature "
        "(backbone.merge_factors) and put TokensToGrid first in the neck chain."
    )


@pytest.mark.shapes
def test_without_image_size_maps_pass_through_and_the_tokens_decide_the_grid() -> None:
    maps = torch.randn(1, 1, 5, 5)
    grid, merged = TokensToGrid([1, 1], patch_size=14, resize_to_grid=False)([maps, numbered(1, 16, 1)])
    assert grid is maps
    assert torch.equal(merged[0, 0], raster(4, 4))


# -- TokensToGrid: token counts -------------------------------------------------------------------------------


@pytest.mark.shapes
def test_an_undeclared_cls_token_is_named() -> None:
    with pytest.raises(InputError) as info:
        TokensToGrid([1], patch_size=2)([numbered(1, 5, 1)], image_size=(4, 4))
    assert str(info.value) == (
        "Feature 0 has 5 tokens, one more than the 2x2 patch grid: the backbone returns a CLS token. Build "
        "TokensToGrid with cls_token: true (backbone.has_cls_token)."
    )


@pytest.mark.shapes
def test_a_declared_cls_token_that_is_absent_is_named() -> None:
    neck = TokensToGrid([1, 1], patch_size=2, cls_token=True)
    with pytest.raises(InputError) as info:
        neck([numbered(1, 5, 1), numbered(1, 4, 1)], image_size=(4, 4))
    assert str(info.value) == (
        "Feature 1 has 4 tokens, exactly the 2x2 patch grid, but cls_token is true: removing a token would shift "
        "every row. Build TokensToGrid with cls_token: false."
    )


@pytest.mark.shapes
@pytest.mark.parametrize(("count", "cls_token", "cls_text"), [(7, False, ""), (4, True, " + 1 CLS")])
def test_a_count_that_fits_no_grid_is_named(count: int, cls_token: bool, cls_text: str) -> None:
    with pytest.raises(InputError) as info:
        TokensToGrid([1], patch_size=3, cls_token=cls_token)([numbered(1, count, 1)], image_size=(6, 12))
    assert str(info.value) == (
        f"Feature 0 has {count} tokens, which fits neither the 2x4 grid of 3-pixel patches (8{cls_text} tokens) "
        "nor a grid merged by 2, 4, 8. Check patch_size (backbone.patch_size) and cls_token "
        "(backbone.has_cls_token)."
    )


@pytest.mark.shapes
def test_a_merged_grid_keeps_its_own_size_or_is_upsampled_by_nearest() -> None:
    # 4 x 8 patch grid; merged by 2 -> 2 x 4 tokens
    own = TokensToGrid([1], patch_size=1, resize_to_grid=False)([numbered(1, 8, 1)], image_size=(4, 8))[0]
    assert torch.equal(own[0, 0], raster(2, 4))
    up = TokensToGrid([1], patch_size=1)([numbered(1, 8, 1)], image_size=(4, 8))[0]
    assert torch.equal(up[0, 0], raster(2, 4).repeat_interleave(2, 0).repeat_interleave(2, 1))


@pytest.mark.shapes
def test_a_merged_grid_with_a_leading_token_drops_it() -> None:
    # 4 x 4 grid merged by 2: 4 tokens, plus one leading CLS token that is not part of the grid
    neck = TokensToGrid([1], patch_size=1, cls_token=True, resize_to_grid=False)
    (grid,) = neck([numbered(1, 5, 1)], image_size=(4, 4))
    assert torch.equal(grid[0, 0], raster(2, 2, 1))


@pytest.mark.shapes
def test_merging_by_eight_and_skipping_factors_that_do_not_divide() -> None:
    neck = TokensToGrid([1], patch_size=1, resize_to_grid=False)
    (grid,) = neck([numbered(1, 2, 1)], image_size=(8, 16))  # 8 x 16 merged by 8 -> 1 x 2
    assert torch.equal(grid[0, 0], raster(1, 2))
    # 2 x 6 grid: 4 does not divide 6, so 3 tokens are 2 x 6 merged by 2 -> 1 x 3
    (grid,) = neck([numbered(1, 3, 1)], image_size=(2, 6))
    assert torch.equal(grid[0, 0], raster(1, 3))
    # 4 x 6 grid: merged by 4 would be 1 token, but 4 does not divide 6: one token fits nothing
    with pytest.raises(InputError, match="fits neither the 4x6 grid"):
        neck([numbered(1, 1, 1)], image_size=(4, 6))
    # 6 x 4 grid: 4 does not divide 6 either
    with pytest.raises(InputError, match="fits neither the 6x4 grid"):
        neck([numbered(1, 1, 1)], image_size=(6, 4))


@pytest.mark.shapes
def test_every_batch_item_and_channel_lands_in_raster_order() -> None:
    (grid,) = TokensToGrid([3], patch_size=2, cls_token=True)([numbered(2, 7, 3)], image_size=(4, 6))
    assert grid.shape == (2, 3, 2, 3)
    for b in range(2):
        for c in range(3):
            assert torch.equal(grid[b, c], raster(2, 3, 1 + 1000 * b + 100 * c))


@pytest.mark.shapes
@pytest.mark.parametrize("shape", [(4, 4), (1, 4, 4, 4, 1), (4,)])
def test_features_that_are_neither_tokens_nor_maps_are_named(shape: tuple) -> None:
    with pytest.raises(InputError) as info:
        TokensToGrid([4, 4], patch_size=2)([torch.zeros(1, 4, 4), torch.zeros(shape)], image_size=(4, 4))
    assert str(info.value) == (
        f"TokensToGrid expects [B, N, C] tokens or [B, C, H, W] maps, got feature 1 of shape {shape}."
    )


# -- ProjectChannels ------------------------------------------------------------------------------------------


@pytest.mark.shapes
def test_project_channels_widths() -> None:
    neck = ProjectChannels([4, 6], out_channels=3)
    assert (neck.in_widths, neck.out_widths) == ([4, 6], [3, 3])
    assert neck.process_channel_list([99, 99]) == [3, 3]
    assert [(p.in_features, p.out_features) for p in neck.projections] == [(4, 3), (6, 3)]
    assert all(p.bias is not None for p in neck.projections)
    neck = ProjectChannels((4, 6), out_channels=(2, 5), bias=False)
    assert neck.channel_list == [4, 6]
    assert [(p.in_features, p.out_features) for p in neck.projections] == [(4, 2), (6, 5)]
    assert all(p.bias is None for p in neck.projections)
    assert neck.process_channel_list([4, 6]) == [2, 5]
    assert neck.process_channel_list([4, 6]) is not neck.out_widths


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("channels", "out_channels", "message"),
    [
        (
            [4, 4],
            [2],
            "ProjectChannels got 1 out_channels [2] for 2 features [4, 4]; give one width per feature or a single "
            "width for all.",
        ),
        ([4], "8", "ProjectChannels out_channels must be an int or a list of ints, got '8'."),
        ([4], True, "ProjectChannels out_channels must be an int or a list of ints, got True."),
        ([4], 2.0, "ProjectChannels out_channels must be an int or a list of ints, got 2.0."),
        ([4], 0, "ProjectChannels out_channels must be a positive integer, got 0."),
        ([4, 4], [3, -1], "ProjectChannels out_channels must be a positive integer, got -1."),
        ([4, 0], 3, "ProjectChannels input channels must be a positive integer, got 0."),
    ],
)
def test_project_channels_refuses_bad_widths(channels: list, out_channels: object, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        ProjectChannels(channels, out_channels=out_channels)
    assert str(info.value) == message


@pytest.mark.numerics
def test_project_channels_projects_along_the_channel_axis() -> None:
    neck = ProjectChannels([2, 2, 2], out_channels=1)
    with torch.no_grad():
        for projection in neck.projections:
            projection.weight.copy_(torch.tensor([[1.0, 10.0]]))
            projection.bias.fill_(0.5)
    maps = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # [1, 2, 1, 2]
    tokens = torch.tensor([[[1.0, 3.0], [2.0, 4.0]]])  # [1, 2 tokens, 2 channels]
    vectors = torch.tensor([[1.0, 3.0]])
    out_maps, out_tokens, out_vectors = neck([maps, tokens, vectors])
    assert torch.equal(out_maps, torch.tensor([[[[31.5, 42.5]]]]))
    assert torch.equal(out_tokens, torch.tensor([[[31.5], [42.5]]]))
    assert torch.equal(out_vectors, torch.tensor([[31.5]]))


@pytest.mark.reliability
def test_project_channels_names_bad_features() -> None:
    neck = ProjectChannels([4, 3], out_channels=2)
    with pytest.raises(InputError) as info:
        neck([torch.zeros(1, 4)])
    assert str(info.value) == "ProjectChannels was built for 2 features but got 1."
    assert [o.shape for o in neck([torch.zeros(1, 4, 2, 2), torch.zeros(1, 5, 3)])] == [(1, 2, 2, 2), (1, 5, 2)]
    with pytest.raises(InputError) as info:
        neck([torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 5)])
    assert str(info.value) == "ProjectChannels feature 1 has 5 channels, expected 3 (shape (1, 3, 5))."
    with pytest.raises(InputError) as info:
        neck([torch.zeros(1, 2, 2, 4), torch.zeros(1, 3)])
    assert str(info.value) == "ProjectChannels feature 0 has 2 channels, expected 4 (shape (1, 2, 2, 4))."
