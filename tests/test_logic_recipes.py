"""Pure logic of earthmind_compat.recipes: each rule's checks, and the chain walk that runs them.

Every expected value is written out by hand (indices, channel lists, whole messages), so a changed
comparison, default or message fails here in milliseconds; tests/test_shapes.py checks the same rules on
real models through hypothesis.
"""

from __future__ import annotations

import pytest
from terratorch.registry import NECK_REGISTRY

from earthmind_compat import recipes
from earthmind_compat.compat import factory_tasks, installed_version
from earthmind_compat.errors import ConfigurationError, UnknownNameError
from earthmind_compat.recipes import (
    DECODER_RULES,
    MAPS,
    SMP_RULE,
    TOKENS,
    UNKNOWN,
    VECTORS,
    FeatureLayout,
    Step,
    check_chain,
    decoder_rule,
    spread_indices,
)

#: AggregateTokens is TerraTorch >= 1.1; on 1.0 the chain checks refuse it earlier (an unknown neck), which
#: tests elsewhere cover.
NEEDS_AGGREGATE_TOKENS = pytest.mark.skipif(
    "AggregateTokens" not in NECK_REGISTRY, reason="AggregateTokens is TerraTorch >= 1.1"
)

#: A ViT-like layout: 3 features of 8 channels, patch 14, with a CLS token.
CLS = FeatureLayout(out_channels=(8, 8, 8), patch_size=14, has_cls_token=True, in_chans=3)
#: Granite-like: no CLS token, patch 16, 4 features of 6 channels.
PLAIN = FeatureLayout(out_channels=(6, 6, 6, 6), patch_size=16, has_cls_token=False, in_chans=5)
#: InternVL with the projector: the last feature lies on a merged grid.
MERGED = FeatureLayout(out_channels=(8, 8, 8), patch_size=14, has_cls_token=True, in_chans=3, merge_factors=(1, 1, 2))


def step(
    layout: FeatureLayout = CLS,
    arguments: dict | None = None,
    kind: str = TOKENS,
    channels: list[int] | None = None,
    pyramid: bool = False,
    where: str = "Neck 1 (X)",
    hint: str = " HINT",
) -> Step:
    return Step(layout, where, arguments or {}, kind, channels or [8, 8, 8], pyramid, hint)


def message(check, value: Step) -> str:
    with pytest.raises(ConfigurationError) as info:
        check(value)
    return str(info.value)


# -- spread_indices -----------------------------------------------------------------------------------------


@pytest.mark.shapes
@pytest.mark.parametrize(
    ("count", "wanted", "expected"),
    [
        (1, 4, [0, 0, 0, 0]),
        (1, 2, [0, 0]),
        (2, 4, [0, 0, 1, 1]),
        (3, 4, [0, 1, 1, 2]),
        (4, 4, [0, 1, 2, 3]),
        (5, 4, [0, 1, 3, 4]),
        (24, 4, [0, 8, 15, 23]),
        (7, 3, [0, 3, 6]),
        (3, 5, [0, 0, 1, 2, 2]),  # 0.5 -> 0 and 1.5 -> 2: round half to even, not truncation
    ],
)
def test_spread_indices(count: int, wanted: int, expected: list[int]) -> None:
    assert spread_indices(count, wanted) == expected


@pytest.mark.shapes
def test_spread_indices_picks_four_by_default() -> None:
    assert spread_indices(1) == [0, 0, 0, 0]
    assert spread_indices(7) == [0, 2, 4, 6]


# -- the neck checks ----------------------------------------------------------------------------------------


@pytest.mark.reliability
def test_tokens_to_grid_fits_the_backbone() -> None:
    check = recipes._tokens_to_grid_fits
    assert check(step(CLS, {"cls_token": True, "patch_size": 14})) is None
    assert check(step(PLAIN, {"patch_size": 16})) is None  # cls_token defaults to false
    assert message(check, step(CLS, {"patch_size": 14})) == (
        "Neck 1 (X) has cls_token=False but backbone.has_cls_token is True; set cls_token: true."
    )
    assert message(check, step(PLAIN, {"cls_token": True, "patch_size": 16})) == (
        "Neck 1 (X) has cls_token=True but backbone.has_cls_token is False; set cls_token: false."
    )
    assert message(check, step(CLS, {"cls_token": True, "patch_size": 16})) == (
        "Neck 1 (X) has patch_size=16 but the backbone's patch size is 14; set patch_size: 14."
    )
    assert message(check, step(CLS, {"cls_token": True})) == (
        "Neck 1 (X) has patch_size=None but the backbone's patch size is 14; set patch_size: 14."
    )


@pytest.mark.reliability
@pytest.mark.parametrize("kind", [MAPS, VECTORS, UNKNOWN])
def test_token_checks_let_other_features_through(kind: str) -> None:
    wrong = {"cls_token": False, "patch_size": 3, "remove_cls_token": False}
    assert recipes._tokens_to_grid_fits(step(CLS, wrong, kind=kind)) is None
    assert recipes._reshape_tokens_fits(step(MERGED, wrong, kind=kind)) is None


@pytest.mark.reliability
def test_reshape_tokens_removes_a_cls_token_exactly_when_there_is_one() -> None:
    check = recipes._reshape_tokens_fits
    assert check(step(CLS, {})) is None  # remove_cls_token defaults to true
    assert check(step(CLS, {"remove_cls_token": 1})) is None
    assert check(step(CLS, {"remove_cls_token": "yes"})) is None  # truthy, as TerraTorch's neck reads it
    assert check(step(PLAIN, {"remove_cls_token": 0})) is None
    assert message(check, step(PLAIN, {})) == (
        "Neck 1 (X) has remove_cls_token=True but the backbone has no CLS token: TerraTorch would drop a patch "
        "token (or keep the CLS token) and reshape into a wrong grid, silently when the count happens to be "
        "square. Use TokensToGrid(patch_size=16, cls_token=False). HINT"
    )
    assert message(check, step(CLS, {"remove_cls_token": False})) == (
        "Neck 1 (X) has remove_cls_token=False but the backbone has a CLS token: TerraTorch would drop a patch "
        "token (or keep the CLS token) and reshape into a wrong grid, silently when the count happens to be "
        "square. Use TokensToGrid(patch_size=14, cls_token=True). HINT"
    )
    assert message(check, step(MERGED, {"remove_cls_token": True})) == (
        "Neck 1 (X) cannot reshape the projector's merged tokens next to the tower's (it removes the CLS "
        "token from every feature). Use TokensToGrid. HINT"
    )


@pytest.mark.reliability
def test_needs_maps() -> None:
    check = recipes._needs_maps
    assert check(step(kind=MAPS)) is None
    assert check(step(kind=UNKNOWN)) is None  # after a neck without a rule the form checks end
    for kind in (TOKENS, VECTORS):
        assert message(check, step(PLAIN, kind=kind)) == (
            f"Neck 1 (X) needs image-shaped maps [B, C, H, W] but gets {kind}; put "
            "TokensToGrid(patch_size=16, cls_token=False) before it. HINT"
        )


@pytest.mark.reliability
def test_four_features() -> None:
    check = recipes._four_features
    assert check(step(kind=MAPS, channels=[8, 8, 8, 8])) is None
    assert message(check, step(kind=MAPS, channels=[8, 8, 8])) == (
        "Neck 1 (X) needs exactly 4 features but gets 3; put SelectIndices(indices=[0, 1, 1, 2]) before it or "
        "use 4 out_indices. HINT"
    )
    assert message(check, step(kind=MAPS, channels=[8] * 5)) == (
        "Neck 1 (X) needs exactly 4 features but gets 5; put SelectIndices(indices=[0, 1, 3, 4]) before it or "
        "use 4 out_indices. HINT"
    )


@pytest.mark.reliability
def test_wide_enough_reads_the_first_two_features() -> None:
    check = recipes._wide_enough
    assert check(step(kind=MAPS, channels=[4, 4, 1, 1])) is None  # the bound is >= 4, and only the first two
    assert message(check, step(kind=MAPS, channels=[3, 8, 8, 8])) == (
        "Neck 1 (X) divides the first two features' channels by 4 and 2; [3, 8] is too narrow. Use width >= 4."
    )
    assert message(check, step(kind=MAPS, channels=[8, 3, 8, 8])).startswith(
        "Neck 1 (X) divides the first two features' channels by 4 and 2; [8, 3] is too narrow."
    )


@pytest.mark.reliability
@pytest.mark.parametrize("indices", [[0], [3], [-4], [-1, 0, 3], (1, 2)])
def test_indices_in_range_accepts(indices: list[int]) -> None:
    assert recipes._indices_in_range(step(arguments={"indices": indices}, channels=[8, 8, 8, 8])) is None


@pytest.mark.reliability
@pytest.mark.parametrize("indices", [None, 3, [], [4], [-5], [0, 4], [True], [1.0], ["1"]])
def test_indices_in_range_rejects(indices: object) -> None:
    got = message(recipes._indices_in_range, step(arguments={"indices": indices}, channels=[8, 8, 8, 8]))
    assert got == (
        f"Neck 1 (X) has indices={indices!r}; there are 4 features, so use a non-empty list of integers in -4..3."
    )


@pytest.mark.reliability
def test_indices_message_without_indices() -> None:
    assert message(recipes._indices_in_range, step(channels=[8, 8])) == (
        "Neck 1 (X) has indices=None; there are 2 features, so use a non-empty list of integers in -2..1."
    )


# -- the decoder checks -------------------------------------------------------------------------------------


@pytest.mark.reliability
def test_needs_pyramid() -> None:
    check = recipes._needs_pyramid
    assert check(step(kind=MAPS, pyramid=True)) is None
    assert message(check, step(kind=MAPS, pyramid=False, where="UNetDecoder")) == (
        "UNetDecoder needs a halving pyramid of maps, but the necks keep every map at the patch grid; add "
        "LearnedInterpolateToPyramidal (after SelectIndices to 4 features). HINT"
    )


@pytest.mark.reliability
def test_one_unet_channel_per_feature() -> None:
    check = recipes._one_unet_channel_per_feature
    assert check(step(arguments={"channels": [16, 8, 4, 2]}, kind=MAPS, channels=[8, 8, 8, 8])) is None
    assert check(step(arguments={"channels": (5,)}, kind=MAPS, channels=[8])) is None
    assert message(check, step(arguments={"channels": 16}, kind=MAPS, channels=[8, 8, 8, 8])) == (
        "UNetDecoder needs one decoder channel entry per feature: 4 features reach it, channels=16; "
        "e.g. decoder_channels: [256, 128, 64, 32]. HINT"
    )
    assert message(check, step(kind=MAPS, channels=[8] * 10)) == (
        "UNetDecoder needs one decoder channel entry per feature: 10 features reach it, channels=None; "
        "e.g. decoder_channels: [256, 128, 64, 32, 16, 8, 4, 2, 1, 1]. HINT"
    )
    assert message(check, step(arguments={"channels": [16, 8, 4]}, kind=MAPS, channels=[8] * 4)).startswith(
        "UNetDecoder needs one decoder channel entry per feature: 4 features reach it, channels=[16, 8, 4];"
    )


@pytest.mark.reliability
def test_linear_decoder_arguments() -> None:
    check = recipes._linear_decoder_arguments
    assert check(step(arguments={"upsampling_size": 14, "num_classes": 2}, kind=MAPS)) is None
    tail = (
        ": upsampling_size = the patch size 14 gives the input's size, and TerraTorch's factory does not pass "
        "num_classes to this decoder itself. HINT"
    )
    assert message(check, step(kind=MAPS)) == (
        "LinearDecoder needs decoder_upsampling_size and decoder_num_classes" + tail
    )
    assert message(check, step(arguments={"upsampling_size": 14}, kind=MAPS)) == (
        "LinearDecoder needs decoder_num_classes" + tail
    )
    assert message(check, step(arguments={"num_classes": 2}, kind=MAPS)) == (
        "LinearDecoder needs decoder_upsampling_size" + tail
    )


@pytest.mark.shapes
def test_to_maps() -> None:
    assert [recipes._to_maps(k) for k in (TOKENS, MAPS, VECTORS, UNKNOWN)] == [MAPS, MAPS, VECTORS, UNKNOWN]


@pytest.mark.shapes
def test_grid_from_tokens() -> None:
    assert recipes._grid_from_tokens(step(PLAIN)) == "TokensToGrid(patch_size=16, cls_token=False)"
    assert recipes._grid_from_tokens(step(CLS)) == "TokensToGrid(patch_size=14, cls_token=True)"


# -- rules by name ------------------------------------------------------------------------------------------


@pytest.mark.registry
def test_known_rule_and_decoder_rule() -> None:
    assert recipes._known_rule("UNetDecoder") is DECODER_RULES["UNetDecoder"]
    assert recipes._known_rule("smp_FPN") is DECODER_RULES["smp_FPN"]
    assert recipes._known_rule("smp_Unet") is SMP_RULE
    assert recipes._known_rule("smp_NoSuchThing") is SMP_RULE
    assert recipes._known_rule("NoSuchDecoder") is None
    assert recipes._known_rule("Xsmp_Unet") is None
    assert decoder_rule("IdentityDecoder") is DECODER_RULES["IdentityDecoder"]
    assert decoder_rule("smp_Unet") is SMP_RULE  # an smp decoder TerraTorch has
    valid = ", ".join(sorted(DECODER_RULES))
    with pytest.raises(UnknownNameError) as info:
        decoder_rule("smp_NoSuchThing")  # not in TerraTorch's registry
    assert str(info.value) == f"Unknown decoder 'smp_NoSuchThing'. Valid decoders: {valid}."
    with pytest.raises(UnknownNameError) as info:
        decoder_rule("UNetDecodr")
    assert str(info.value) == (
        f"Unknown decoder 'UNetDecodr'. Did you mean 'UNetDecoder' or 'UperNetDecoder' or 'FCNDecoder'? "
        f"Valid decoders: {valid}."
    )


@pytest.mark.reliability
def test_check_task(monkeypatch: pytest.MonkeyPatch) -> None:
    # a TerraTorch whose factory builds every task (>= 1.1), whatever is installed
    monkeypatch.setattr(
        recipes, "factory_tasks", lambda: ("segmentation", "regression", "classification", "scalar_regression")
    )
    assert recipes._check_task("scalar_regression") == "scalar_regression"
    with pytest.raises(UnknownNameError) as info:
        recipes._check_task("segmentaton")
    assert str(info.value) == (
        "Unknown task 'segmentaton'. Did you mean 'segmentation'? "
        "Valid tasks: classification, regression, scalar_regression, segmentation."
    )
    # a TerraTorch whose factory lacks a task (1.0 has no scalar_regression): our compat probe, not TerraTorch
    monkeypatch.setattr(recipes, "factory_tasks", lambda: ("segmentation", "regression", "classification"))
    monkeypatch.setattr(recipes, "installed_version", {"terratorch": "1.0.2"}.__getitem__)  # asked for terratorch
    assert recipes._check_task("classification") == "classification"
    with pytest.raises(ConfigurationError) as info:
        recipes._check_task("scalar_regression")
    assert str(info.value) == (
        "TerraTorch 1.0.2 cannot build a scalar_regression model (its EncoderDecoderFactory builds "
        "segmentation, regression, classification); scalar_regression needs TerraTorch >= 1.2."
    )


@pytest.mark.shapes
def test_fix_hint() -> None:
    assert recipes._fix_hint(PLAIN, "FCNDecoder", "segmentation") == (
        " The recommended chain for FCNDecoder is necks=[{'name': 'TokensToGrid', 'patch_size': 16, "
        "'cls_token': False}]."
    )
    assert recipes._fix_hint(PLAIN, "NoSuchDecoder", "segmentation") == ""


# -- the chain walk -----------------------------------------------------------------------------------------

GRID = {"name": "TokensToGrid", "patch_size": 14, "cls_token": True}
HINT_FCN = (
    " The recommended chain for FCNDecoder is necks=[{'name': 'TokensToGrid', 'patch_size': 14, 'cls_token': True}]."
)


@pytest.mark.shapes
def test_check_chain_returns_what_reaches_the_decoder() -> None:
    assert check_chain(CLS, [GRID], "FCNDecoder") == [8, 8, 8]
    chain = [GRID, {"name": "SelectIndices", "indices": [0, 1, 1, 2]}, {"name": "LearnedInterpolateToPyramidal"}]
    assert check_chain(CLS, chain, "UNetDecoder", decoder_kwargs={"channels": [8, 4, 2, 1]}) == [2, 4, 8, 8]
    assert check_chain(CLS, [GRID, {"name": "ProjectChannels", "out_channels": 4}], "FCNDecoder") == [4, 4, 4]


@pytest.mark.reliability
def test_check_chain_numbers_the_necks_from_zero() -> None:
    bad = {"name": "TokensToGrid", "patch_size": 16, "cls_token": True}
    # a second TokensToGrid sees maps, which its check lets through; a wrong first one is caught
    assert check_chain(CLS, [GRID, bad], "FCNDecoder") == [8, 8, 8]
    with pytest.raises(ConfigurationError) as info:
        check_chain(CLS, [bad], "FCNDecoder")
    assert (
        str(info.value)
        == "Neck 0 (TokensToGrid) has patch_size=16 but the backbone's patch size is 14; set patch_size: 14."
    )


@pytest.mark.reliability
@pytest.mark.parametrize("spec", [["TokensToGrid"], {"patch_size": 14}, "TokensToGrid"])
def test_check_chain_wants_mappings_with_a_name(spec: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        check_chain(CLS, [GRID, spec], "FCNDecoder")
    assert str(info.value) == f"Neck 1 must be a mapping with a 'name' key, got {spec!r}."


@pytest.mark.reliability
def test_check_chain_unknown_neck() -> None:
    with pytest.raises(UnknownNameError) as info:
        check_chain(CLS, [{"name": "TokensToGird", "patch_size": 14}], "FCNDecoder")
    assert str(info.value).startswith("Unknown neck 'TokensToGird'. Did you mean 'TokensToGrid'")


@pytest.mark.reliability
def test_check_chain_passes_the_current_features_to_each_check() -> None:
    # After TokensToGrid + SelectIndices(2 features) the pyramid neck sees maps, 2 features, no pyramid yet.
    chain = [GRID, {"name": "SelectIndices", "indices": [0, 2]}, {"name": "LearnedInterpolateToPyramidal"}]
    with pytest.raises(ConfigurationError) as info:
        check_chain(CLS, chain, "FCNDecoder")
    assert str(info.value) == (
        "Neck 2 (LearnedInterpolateToPyramidal) needs exactly 4 features but gets 2; put "
        "SelectIndices(indices=[0, 0, 1, 1]) before it or use 4 out_indices." + HINT_FCN
    )
    # straight from tokens: the first check that fails is the form
    with pytest.raises(ConfigurationError) as info:
        check_chain(CLS, [{"name": "LearnedInterpolateToPyramidal"}], "FCNDecoder")
    assert str(info.value) == (
        "Neck 0 (LearnedInterpolateToPyramidal) needs image-shaped maps [B, C, H, W] but gets tokens; put "
        "TokensToGrid(patch_size=14, cls_token=True) before it." + HINT_FCN
    )
    # a neck of another registry source (no rule) ends the form checks: maps are not required after it
    chain = [{"name": "PermuteDims", "new_order": [0, 1, 2]}, {"name": "InterpolateToPyramidal"}]
    assert check_chain(CLS, chain, "FCNDecoder") == [8, 8, 8]


@pytest.mark.reliability
def test_check_chain_tracks_the_pyramid_to_the_decoder() -> None:
    unet = {"channels": [8, 4, 2, 1]}
    four = [GRID, {"name": "SelectIndices", "indices": [0, 1, 1, 2]}]
    with pytest.raises(ConfigurationError, match=r"^UNetDecoder needs a halving pyramid"):
        check_chain(CLS, four, "UNetDecoder", decoder_kwargs=unet)
    # a pyramid neck anywhere before keeps the pyramid flag through later necks without a pyramid
    chain = [*four, {"name": "LearnedInterpolateToPyramidal"}, {"name": "SelectIndices", "indices": [0, 1, 2, 3]}]
    assert check_chain(CLS, chain, "UNetDecoder", decoder_kwargs=unet) == [2, 4, 8, 8]


@pytest.mark.reliability
def test_check_chain_wraps_a_neck_that_cannot_be_built() -> None:
    with pytest.raises(ConfigurationError) as info:
        check_chain(CLS, [GRID, {"name": "ProjectChannels", "out_channels": 4, "nonsense": 1}], "FCNDecoder")
    assert str(info.value).startswith(
        "Neck 1 (ProjectChannels) could not be built for features with channels [8, 8, 8]: TypeError: "
    )
    assert isinstance(info.value.__cause__, TypeError)


@pytest.mark.reliability
def test_check_chain_keeps_our_own_errors() -> None:
    # the second TokensToGrid sees maps (no form check); its constructor's own error comes through unwrapped
    with pytest.raises(ConfigurationError) as info:
        check_chain(CLS, [GRID, {"name": "TokensToGrid", "patch_size": 14, "cls_token": "yes"}], "FCNDecoder")
    assert str(info.value) == "TokensToGrid cls_token must be true or false, got 'yes'."


# -- what the decoder and the task head need ---------------------------------------------------------------


@pytest.mark.reliability
@NEEDS_AGGREGATE_TOKENS
def test_decoder_check_for_pixelwise_tasks() -> None:
    with pytest.raises(ConfigurationError) as info:
        check_chain(CLS, [], "FCNDecoder")
    assert str(info.value) == (
        "FCNDecoder for segmentation needs image-shaped maps [B, C, H, W] but the necks give [B, N, C] tokens; "
        "put TokensToGrid(patch_size=14, cls_token=True) first." + HINT_FCN
    )
    with pytest.raises(ConfigurationError) as info:
        check_chain(CLS, [GRID, {"name": "AggregateTokens"}], "FCNDecoder", "regression")
    assert str(info.value).startswith(
        "FCNDecoder for regression needs image-shaped maps [B, C, H, W] but the necks give pooled [B, C] vectors; "
        "put TokensToGrid(patch_size=14, cls_token=True) first."
    )


@pytest.mark.reliability
@NEEDS_AGGREGATE_TOKENS
@pytest.mark.parametrize("task", ["classification", "scalar_regression"])
def test_decoder_check_for_scalar_tasks(task: str) -> None:
    if task not in factory_tasks():
        pytest.skip(f"TerraTorch {installed_version('terratorch')} has no {task} task (from 1.2)")
    with pytest.raises(ConfigurationError) as info:
        check_chain(CLS, [], "IdentityDecoder", task)
    assert str(info.value) == (
        f"{task} would feed [B, N, C] tokens to TerraTorch's ScalarHead, which treats dimension 1 as channels "
        "(N tokens, not C); put TokensToGrid (or AggregateTokens) first. The recommended chain for "
        "IdentityDecoder is necks=[{'name': 'TokensToGrid', 'patch_size': 14, 'cls_token': True}]."
    )
    # maps and pooled vectors both suit the head; the decoder's own checks are for pixel-wise tasks only
    assert check_chain(CLS, [GRID], "IdentityDecoder", task) == [8, 8, 8]
    assert check_chain(CLS, [GRID, {"name": "AggregateTokens"}], "IdentityDecoder", task) == [8, 8, 8]
    assert check_chain(CLS, [GRID], "UNetDecoder", task) == [8, 8, 8]


@pytest.mark.reliability
def test_decoder_checks_run_in_order_for_known_and_smp_decoders() -> None:
    with pytest.raises(ConfigurationError, match=r"^UNetDecoder needs a halving pyramid"):
        check_chain(CLS, [GRID], "UNetDecoder")
    with pytest.raises(ConfigurationError, match=r"^smp_Unet needs a halving pyramid"):
        check_chain(CLS, [GRID], "smp_Unet")
    with pytest.raises(ConfigurationError, match=r"^LinearDecoder needs decoder_upsampling_size and"):
        check_chain(CLS, [GRID], "LinearDecoder")
    # a decoder without a rule gets no decoder checks, and no hint
    assert check_chain(CLS, [GRID], "MLPDecoder") == [8, 8, 8]


@pytest.mark.reliability
def test_decoder_checks_end_after_an_unknown_neck() -> None:
    assert check_chain(CLS, [{"name": "PermuteDims", "new_order": [0, 1, 2]}], "UNetDecoder") == [8, 8, 8]
    assert check_chain(CLS, [{"name": "PermuteDims", "new_order": [0, 1, 2]}], "IdentityDecoder", "classification") == [
        8,
        8,
        8,
    ]


@pytest.mark.shapes
@pytest.mark.parametrize(("layout", "factors"), [(MERGED, [1, 1, 2]), (CLS, None), (PLAIN, None)])
def test_the_recommended_tokens_to_grid_carries_the_merge_factors_of_merged_features(layout, factors) -> None:
    """Written only where some feature lies on a merged grid (TerraTorch 1.0 places it with them, see necks.py)."""
    first = recipes.recommend(layout, "FCNDecoder").necks[0]
    assert first["name"] == "TokensToGrid"
    assert first.get("merge_factors") == factors
    assert layout.has_merged_features is (factors is not None)
