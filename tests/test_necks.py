"""Our necks (TokensToGrid, ProjectChannels) and every neck's ``process_channel_list`` against reality."""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from terratorch.models.necks import build_neck_list
from terratorch.registry import NECK_REGISTRY
from upstream_bugs import TERRATORCH_AGGREGATE_TOKENS_CHANNELS

from earthmind_compat.errors import ConfigurationError, InputError
from earthmind_compat.necks import NECKS, ProjectChannels, TokensToGrid

EXAMPLES = settings().max_examples


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: thread start-up costs more than the work, and the two cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def numbered_tokens(batch: int, count: int, channels: int) -> torch.Tensor:
    """Token k of image b carries the value 1000 * b + k in every channel."""
    values = torch.arange(count, dtype=torch.float32)[None, :] + 1000 * torch.arange(batch)[:, None]
    return values[:, :, None].expand(batch, count, channels).clone()


# -- registry ------------------------------------------------------------------------------------------------


@pytest.mark.registry
@pytest.mark.parametrize("neck", NECKS, ids=lambda n: n.__name__)
def test_our_necks_build_by_name_through_terratorch(neck):
    specs = {
        "TokensToGrid": {"name": "TokensToGrid", "patch_size": 14, "cls_token": True},
        "ProjectChannels": {"name": "ProjectChannels", "out_channels": 8},
    }
    (built,), channels = build_neck_list([specs[neck.__name__]], [32])
    assert type(built) is neck
    assert NECK_REGISTRY.find_class(neck.__name__) is neck
    # (TerraTorch >= 1.1 also stores the output list as built.channel_list; 1.0 keeps the input list there)
    assert channels == {"TokensToGrid": [32], "ProjectChannels": [8]}[neck.__name__]


# -- TokensToGrid ---------------------------------------------------------------------------------------------


@pytest.mark.shapes
@pytest.mark.parametrize(("rows", "cols"), [(4, 4), (2, 5), (3, 7), (1, 1)])
@pytest.mark.parametrize("cls_token", [False, True])
def test_tokens_land_in_raster_order(rows, cols, cls_token):
    patch = 14
    tokens = numbered_tokens(2, rows * cols + cls_token, 3)
    (grid,) = TokensToGrid([3], patch_size=patch, cls_token=cls_token)(
        [tokens], image_size=(rows * patch, cols * patch)
    )
    assert grid.shape == (2, 3, rows, cols)
    expected = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols) + cls_token
    assert torch.equal(grid[0, 0], expected)
    assert torch.equal(grid[1, 2], expected + 1000)


@pytest.mark.shapes
def test_the_granite_two_by_five_grid_is_never_reshaped_wrongly():
    # TerraTorch's ReshapeTokensToImage(remove_cls_token=True) turns these 10 tokens into a 3 x 3 map.
    tokens = numbered_tokens(1, 10, 4)
    with pytest.raises(InputError, match="cls_token: false"):
        TokensToGrid([4], patch_size=16, cls_token=True)([tokens], image_size=(32, 80))
    (grid,) = TokensToGrid([4], patch_size=16, cls_token=False)([tokens], image_size=(32, 80))
    assert grid.shape == (1, 4, 2, 5)


@pytest.mark.shapes
def test_a_cls_token_that_is_not_declared_is_an_error():
    tokens = numbered_tokens(1, 17, 4)
    with pytest.raises(InputError, match="cls_token: true"):
        TokensToGrid([4], patch_size=14)([tokens], image_size=(56, 56))


@pytest.mark.shapes
def test_without_image_size_square_grids_work_and_others_say_why():
    neck = TokensToGrid([4], patch_size=14, cls_token=True)
    (grid,) = neck([numbered_tokens(1, 17, 4)])  # TerraTorch 1.0.x calls neck(features)
    assert grid.shape == (1, 4, 4, 4)
    with pytest.raises(InputError, match=r"TerraTorch < 1\.1"):
        neck([numbered_tokens(1, 11, 4)])


@pytest.mark.shapes
@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("resize", [True, False])
def test_merged_token_grids_are_recognised(factor, resize):
    rows, cols = 8, 4
    tower = numbered_tokens(2, rows * cols + 1, 6)
    merged = numbered_tokens(2, (rows // factor) * (cols // factor), 10)
    neck = TokensToGrid([6, 10], patch_size=14, cls_token=True, resize_to_grid=resize)
    full, coarse = neck([tower, merged], image_size=(rows * 14, cols * 14))
    assert full.shape == (2, 6, rows, cols)
    if resize:
        assert coarse.shape == (2, 10, rows, cols)
        assert torch.equal(
            coarse[0, 0, ::factor, ::factor].flatten(), torch.arange(rows * cols // factor**2, dtype=torch.float32)
        )
    else:
        assert coarse.shape == (2, 10, rows // factor, cols // factor)


@pytest.mark.shapes
def test_maps_pass_through_and_bad_inputs_are_named():
    neck = TokensToGrid([4], patch_size=14)
    maps = torch.randn(1, 4, 3, 3)
    assert neck([maps], image_size=(42, 42))[0] is maps
    with pytest.raises(InputError, match="fits neither"):
        neck([numbered_tokens(1, 13, 4)], image_size=(56, 56))
    with pytest.raises(InputError, match="not a multiple of patch_size=14"):
        neck([numbered_tokens(1, 16, 4)], image_size=(50, 56))
    with pytest.raises(InputError, match="expects"):
        neck([torch.randn(4, 4)], image_size=(56, 56))


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"patch_size": 0}, "positive integer"), ({"patch_size": 14, "cls_token": "yes"}, "true or false")],
)
def test_tokens_to_grid_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        NECK_REGISTRY.build("TokensToGrid", [4], **kwargs)


# -- ProjectChannels -----------------------------------------------------------------------------------------


@pytest.mark.shapes
def test_project_channels_is_one_linear_map_on_tokens_maps_and_vectors():
    torch.manual_seed(0)
    neck = ProjectChannels([6, 6, 6], out_channels=[3, 5, 2])
    tokens, maps, vectors = torch.randn(2, 7, 6), torch.randn(2, 6, 3, 4), torch.randn(2, 6)
    out = neck([tokens, maps, vectors])
    assert [tuple(o.shape) for o in out] == [(2, 7, 3), (2, 5, 3, 4), (2, 2)]
    weight, bias = neck.projections[1].weight, neck.projections[1].bias
    expected = torch.einsum("oc,bchw->bohw", weight, maps) + bias[None, :, None, None]
    torch.testing.assert_close(out[1], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0], tokens @ neck.projections[0].weight.T + neck.projections[0].bias)


@pytest.mark.reliability
def test_project_channels_errors():
    with pytest.raises(ConfigurationError, match="one width per feature"):
        ProjectChannels([4, 4], out_channels=[2])
    with pytest.raises(ConfigurationError, match="int or a list"):
        ProjectChannels([4], out_channels="8")
    neck = ProjectChannels([4], out_channels=2)
    with pytest.raises(InputError, match="has 5 channels, expected 4"):
        neck([torch.randn(1, 5, 2, 2)])
    with pytest.raises(InputError, match="built for 1 features but got 2"):
        neck([torch.randn(1, 4), torch.randn(1, 4)])


# -- process_channel_list of every neck, ours and TerraTorch's, against the real output --------------------


def channels_of(feature: torch.Tensor, kind: str) -> int:
    return feature.shape[-1] if kind == "tokens" else feature.shape[1]


@st.composite
def neck_cases(draw):
    """A neck name, its arguments, an input list and the kind of its outputs."""
    available = [
        "TokensToGrid",
        "ProjectChannels",
        "SelectIndices",
        "InterpolateToPyramidal",
        "MaxpoolToPyramidal",
        "ReshapeTokensToImage",
        "AddBottleneckLayer",
        "LearnedInterpolateToPyramidal",
        "AggregateTokens",
        "FeaturePyramidNetworkNeck",
    ]
    name = draw(st.sampled_from([n for n in available if n in NECK_REGISTRY]))
    count = 4 if name == "LearnedInterpolateToPyramidal" else draw(st.integers(1, 4))
    channels = draw(st.lists(st.integers(4, 24), min_size=count, max_size=count))
    batch = draw(st.integers(1, 2))
    side = draw(st.sampled_from([2, 4, 8]))
    rows, cols = side, draw(st.sampled_from([side, 2 * side]))
    tokens = [torch.randn(batch, rows * cols, c) for c in channels]
    maps = [torch.randn(batch, c, rows, cols) for c in channels]
    args: dict = {}
    inputs, kind, call = maps, "maps", {}
    if name == "TokensToGrid":
        cls = draw(st.booleans())
        args = {"patch_size": 8, "cls_token": cls}
        inputs = [torch.randn(batch, rows * cols + cls, c) for c in channels]
        call = {"image_size": (rows * 8, cols * 8)}
    elif name == "ReshapeTokensToImage":
        args = {"remove_cls_token": False}
        inputs = [torch.randn(batch, side * side, c) for c in channels]
    elif name == "ProjectChannels":
        per_feature = draw(st.booleans())
        widths = draw(st.lists(st.integers(1, 16), min_size=count, max_size=count))
        args = {"out_channels": widths if per_feature else widths[0]}
        inputs, kind = draw(st.sampled_from([(tokens, "tokens"), (maps, "maps")]))
    elif name == "SelectIndices":
        args = {"indices": draw(st.lists(st.integers(-count, count - 1), min_size=1, max_size=5))}
    elif name == "InterpolateToPyramidal":
        args = {"scale_factor": draw(st.sampled_from([1, 2]))}
    elif name == "MaxpoolToPyramidal":
        inputs = [torch.randn(batch, c, 8, 8) for c in channels]
        args = {"kernel_size": 2}
    elif name == "AggregateTokens":
        args = {"pooling": draw(st.sampled_from(["mean", "max"]))}
        if "indices" in inspect.signature(NECK_REGISTRY.find_class(name)).parameters:  # TerraTorch >= 1.2
            args["indices"] = list(range(count))
            inputs = tokens
        else:  # TerraTorch 1.1: one feature, by ``index``; a single input (with more: the upstream bug below)
            args["index"] = draw(st.sampled_from([0, -1]))
            channels, inputs = channels[:1], tokens[:1]
        kind = "vectors"
    elif name == "FeaturePyramidNetworkNeck":
        args = {"out_channel": draw(st.integers(1, 16)), "output_ordered_dict": False}
    return name, args, channels, inputs, kind, call


@pytest.mark.shapes
@TERRATORCH_AGGREGATE_TOKENS_CHANNELS.mark
def test_aggregate_tokens_predicts_the_channels_of_the_selected_layer():
    if "AggregateTokens" not in NECK_REGISTRY:
        pytest.skip("TerraTorch 1.0 has no AggregateTokens")
    cls = NECK_REGISTRY.find_class("AggregateTokens")
    args = {"indices": [0]} if "indices" in inspect.signature(cls).parameters else {"index": 0}
    (neck,), predicted = build_neck_list([{"name": "AggregateTokens", "pooling": "mean", **args}], [8, 16])
    with torch.no_grad():
        outputs = neck([torch.randn(2, 4, 8), torch.randn(2, 4, 16)])
    assert [o.shape[-1] for o in outputs] == [8]
    assert predicted == [8]


@pytest.mark.shapes
@settings(max_examples=4 * EXAMPLES)
@given(neck_cases())
def test_process_channel_list_predicts_the_real_channels(case):
    name, args, channels, inputs, kind, call = case
    (neck,), predicted = build_neck_list([{"name": name, **args}], channels)
    with torch.no_grad():
        outputs = neck([t.clone() for t in inputs], **call)
    real = [channels_of(o, kind) for o in outputs]
    assert real == predicted, f"{name}{args}: predicted {predicted}, got {real}"
