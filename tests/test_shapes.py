"""Layer 2: property tests of the recommended neck chains on every backbone, decoder and task head.

Random bands (1-13), image sizes (not multiples of the patch: TerraTorch pads and crops back), batch sizes,
out_indices, backbone options, feature widths and decoders must give ``[B, classes, H, W]`` (``[B, H, W]``
for one regression output, ``[B, classes]`` for scalar tasks); every neck's ``process_channel_list``
prediction must equal the channels it really produces; and a broken chain must raise our
ConfigurationError when the model is built, before any decoder runs.

Models are built the way a YAML config builds them (``EncoderDecoderFactory`` with ``Recipe.model_args``)
and cached by configuration, so each hypothesis example checks several input sizes on one model.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from terratorch.models import EncoderDecoderFactory
from terratorch.registry import NECK_REGISTRY

from earthmind_compat.builders import BACKBONE_BUILDERS
from earthmind_compat.compat import (
    factory_takes_num_outputs,
    factory_tasks,
    installed_version,
    necks_receive_image_size,
    terratorch_at_least,
)
from earthmind_compat.errors import ConfigurationError, UnknownNameError
from earthmind_compat.recipes import DECODER_RULES, build_model, recommend

pytestmark = pytest.mark.shapes

EXAMPLES = settings().max_examples
BACKBONES = sorted(BACKBONE_BUILDERS)
TASK_DECODERS = [
    *(("segmentation", d) for d in DECODER_RULES),
    ("regression", "UperNetDecoder"),
    ("regression", "FCNDecoder"),
    ("classification", "IdentityDecoder"),
    ("classification", "UperNetDecoder"),
    ("scalar_regression", "IdentityDecoder"),
]
CASES: list[tuple] = []


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: thread start-up costs more than the work, and the two cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    print(f"\ntest_shapes: {len(CASES)} forward cases, {len(set(c[0] for c in CASES))} distinct models")


@functools.cache
def tiny_facts(backbone: str) -> tuple[int, frozenset[str]]:
    """Depth of the tiny preset and the constructor's argument names (from a meta-device build)."""
    from earthmind_compat.backbones.base import argument_names

    with torch.device("meta"):
        module = BACKBONE_BUILDERS[backbone](preset="tiny")
    return max(module.out_indices) + 1, frozenset(argument_names(type(module).__init__))


@st.composite
def model_configs(draw, backbone: str, task: str, decoder: str):
    depth, arguments = tiny_facts(backbone)
    bands = draw(st.integers(1, 13))
    kwargs: dict = {"preset": "tiny", "in_chans": bands}
    if "language_layers" in arguments:  # language layers after the projector extend the stack out_indices counts
        kwargs["language_layers"] = draw(st.integers(0, 2))
        depth += kwargs["language_layers"]
        if kwargs["language_layers"]:
            kwargs["language_attention"] = draw(st.sampled_from(["bidirectional", "causal"]))
    layers = st.lists(st.integers(-depth, depth - 1), min_size=1, max_size=depth, unique_by=lambda i: i % depth)
    out_indices = draw(st.none() | layers)
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)
    for flag in ("keep_cls_token", "with_projector", "bidirectional_mamba"):
        if flag in arguments:
            kwargs[flag] = draw(st.booleans())
    merged = kwargs.get("with_projector") or kwargs.get("language_layers")
    if merged and kwargs.get("keep_cls_token") and "modalities" in arguments:
        kwargs["keep_cls_token"] = False  # EarthMind refuses this pair with a ConfigurationError of its own
    if "modalities" in arguments and bands >= 2 and draw(st.booleans()):
        sar = draw(st.integers(1, bands - 1))
        kwargs["modalities"] = (("SAR", sar), ("OPTICAL", bands - sar))
        del kwargs["in_chans"]
        if merged and "fusion" in arguments:
            kwargs["fusion"] = draw(st.sampled_from(["concat", "gate"]))  # EarthMind: same shapes either way
    if task.endswith("regression"):
        outputs = draw(st.integers(1, 2)) if factory_takes_num_outputs() else 1  # TerraTorch 1.0: one output
    else:
        outputs = draw(st.integers(2, 5))
    width = draw(st.none() | st.sampled_from([8, 12]))
    return backbone, task, decoder, tuple(sorted(kwargs.items())), outputs, width


@functools.lru_cache(maxsize=16)
def built(config: tuple) -> tuple[torch.nn.Module, int]:
    """The model of ``config``, built as a TerraTorch YAML config builds it (and its band count)."""
    backbone, task, decoder, kwargs, outputs, width = config
    kwargs = dict(kwargs)
    if "modalities" in kwargs:
        kwargs["modalities"] = dict(kwargs["modalities"])
    if "out_indices" in kwargs:
        kwargs["out_indices"] = list(kwargs["out_indices"])
    recipe = recommend(backbone, decoder, task, width=width, outputs=outputs, **kwargs)
    head = {"num_classes": outputs} if not task.endswith("regression") else {}
    if task.endswith("regression") and factory_takes_num_outputs():
        head = {"num_outputs": outputs}
    prefixed = {f"backbone_{k}": v for k, v in kwargs.items()}
    model = EncoderDecoderFactory().build_model(task, **recipe.model_args(backbone, **prefixed, **head)).eval()
    bands = sum(dict(kwargs["modalities"]).values()) if "modalities" in kwargs else kwargs["in_chans"]
    return model, bands


def channel_count(feature: torch.Tensor) -> int:
    return feature.shape[-1] if feature.ndim == 3 else feature.shape[1]


def expected_shape(task: str, batch: int, outputs: int, height: int, width: int) -> tuple[int, ...]:
    if task in ("classification", "scalar_regression"):
        return (batch, outputs)
    if outputs == 1:  # TerraTorch squeezes a single output channel
        return (batch, height, width)
    return (batch, outputs, height, width)


#: Sides from one patch (16 px) up: TerraTorch's reflect padding fails on images no larger than the padding
#: (before 1.2, which pads to 2 patches: from 17 px, see README troubleshooting). Without the image size
#: (TerraTorch 1.0) only square token grids can be placed, so the images are square there (test_necks checks
#: the error otherwise).
MIN_SIDE = 16 if terratorch_at_least("1.2") else 17
if necks_receive_image_size():
    side = st.integers(MIN_SIDE, 90)
    sizes = st.lists(st.tuples(st.integers(1, 3), side, side), min_size=2, max_size=4)
else:
    square = st.tuples(st.integers(1, 3), st.integers(MIN_SIDE, 90)).map(lambda s: (*s, s[1]))
    sizes = st.lists(square, min_size=2, max_size=4)


def skip_unless_the_factory_builds(task: str) -> None:
    """TerraTorch before 1.2 has no scalar_regression task; test_tasks_the_factory_lacks_are_refused covers it there."""
    if task not in factory_tasks():
        pytest.skip(f"TerraTorch {installed_version('terratorch')} has no {task} task")


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize(("task", "decoder"), TASK_DECODERS, ids=lambda v: str(v))
@settings(max_examples=max(3, EXAMPLES // 5))
@given(data=st.data())
def test_recommended_chain_gives_the_task_shape_and_channels_as_predicted(backbone, task, decoder, data):
    skip_unless_the_factory_builds(task)
    config = data.draw(model_configs(backbone, task, decoder), label="config")
    shapes = data.draw(sizes, label="batch, height, width")
    outputs = config[4]
    event(f"out_indices={dict(config[3]).get('out_indices')}")
    model, bands = built(config)
    necks = list(model.neck) if isinstance(model.neck, torch.nn.Sequential) else []
    seen: dict[int, list[int]] = {}
    hooks = [
        neck.register_forward_hook(lambda module, args, out, i=i: seen.__setitem__(i, [channel_count(f) for f in out]))
        for i, neck in enumerate(necks)
    ]
    # Each neck's own process_channel_list, chained from the backbone's out_channels (not neck.channel_list:
    # TerraTorch >= 1.1 overwrites it with the prediction, 1.0 keeps the input channels there).
    predicted, channels = [], list(model.encoder.out_channels)
    for neck in necks:
        channels = neck.process_channel_list(channels)
        predicted.append(list(channels))
    try:
        for batch, height, width in shapes:
            x = torch.randn(batch, bands, height, width)
            with torch.no_grad():
                output = model(x).output
            CASES.append((config, batch, height, width))
            assert tuple(output.shape) == expected_shape(task, batch, outputs, height, width)
            assert torch.isfinite(output).all()
            for i, neck in enumerate(necks):
                assert seen[i] == predicted[i], f"{type(neck).__name__} predicted {predicted[i]}, produced {seen[i]}"
    finally:
        for hook in hooks:
            hook.remove()


# -- impossible combinations fail at build time, from our checks -------------------------------------------


def _drop(chain, name):
    return [n for n in chain if n["name"] != name]


def _replace_first(chain, spec):
    return [spec, *chain[1:]]


@st.composite
def broken_chains(draw):
    """A backbone, a task/decoder, a broken version of the recommended chain, and what the error must say."""
    backbone = draw(st.sampled_from(BACKBONES))
    task, decoder = draw(st.sampled_from([(t, d) for t, d in TASK_DECODERS if t in factory_tasks()]))
    depth, _ = tiny_facts(backbone)
    count = draw(st.integers(1, depth))
    kwargs = {"preset": "tiny", "in_chans": 3, "out_indices": list(range(depth - count, depth))}
    recipe = recommend(backbone, decoder, task, outputs=2, **kwargs)
    chain, decoder_kwargs = recipe.necks, dict(recipe.decoder_kwargs)
    first = chain[0]
    pyramid = any(n["name"] == "LearnedInterpolateToPyramidal" for n in chain)
    breakages = {
        "no reshape": (_drop(chain, "TokensToGrid"), "TokensToGrid"),
        "cls flipped": (_replace_first(chain, {**first, "cls_token": not first["cls_token"]}), "cls_token"),
        "patch size": (_replace_first(chain, {**first, "patch_size": first["patch_size"] + 2}), "patch_size"),
        "terratorch reshape with the wrong cls": (
            _replace_first(chain, {"name": "ReshapeTokensToImage", "remove_cls_token": not first["cls_token"]}),
            "remove_cls_token",
        ),
        "typo in a neck name": (_replace_first(chain, {**first, "name": "TokenToGrid"}), "Did you mean"),
        "index out of range": ([*chain, {"name": "SelectIndices", "indices": [7]}], "indices"),
    }
    if task in ("segmentation", "regression") and "AggregateTokens" in NECK_REGISTRY:  # TerraTorch >= 1.1
        breakages["pooled before a pixel decoder"] = ([*chain, {"name": "AggregateTokens"}], "pooled")
    if task in ("classification", "scalar_regression"):
        breakages["tokens into the scalar head"] = ([], "ScalarHead")
    if pyramid and count != 4:
        breakages["four features expected"] = (_drop(chain, "SelectIndices"), "exactly 4 features")
    if pyramid and decoder != "UperNetDecoder":
        no_pyramid = [n for n in chain if n["name"] not in ("SelectIndices", "LearnedInterpolateToPyramidal")]
        breakages["no pyramid"] = (no_pyramid, "halving pyramid")
    if decoder == "UNetDecoder":
        breakages["unet channels"] = (chain, "one decoder channel entry per feature")
    which = draw(st.sampled_from(sorted(breakages)))
    if which == "unet channels":
        decoder_kwargs["channels"] = decoder_kwargs["channels"][:-1]
    return backbone, task, decoder, kwargs, decoder_kwargs, which, *breakages[which]


@settings(max_examples=4 * EXAMPLES)
@given(broken_chains())
def test_an_impossible_chain_fails_when_the_model_is_built(case):
    backbone, task, decoder, kwargs, decoder_kwargs, which, chain, message = case
    note(f"{which}: {chain}")
    outputs = {"num_outputs": 1} if task.endswith("regression") else {"num_classes": 2}
    with pytest.raises((ConfigurationError, UnknownNameError), match=message) as caught:
        build_model(backbone, decoder, task, necks=chain, decoder_kwargs=decoder_kwargs, **outputs, **kwargs)
    # Raised by our check before TerraTorch builds or runs anything, not a wrapped failure from inside.
    assert caught.value.__cause__ is None
    assert caught.traceback[-1].path.name in ("recipes.py", "errors.py")


# -- the helper itself ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize(("task", "decoder"), TASK_DECODERS, ids=lambda v: str(v))
def test_build_model_from_two_names(backbone, task, decoder):
    skip_unless_the_factory_builds(task)
    outputs = {"num_outputs": 1} if task.endswith("regression") else {"num_classes": 3}
    model = build_model(backbone, decoder, task, preset="tiny", in_chans=4, **outputs)
    output = model.train()(torch.randn(2, 4, 40, 52)).output
    output.float().square().mean().backward()
    # gradients reach every trainable part: backbone, necks, decoder and head (IdentityDecoder has none)
    parts = {"encoder": model.encoder, "neck": getattr(model, "neck", None), "decoder": model.decoder}
    parts["head"] = getattr(model, "head", None)
    checked = 0
    for part, module in parts.items():
        if module is None:
            continue
        for n, p in module.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{part}.{n} got no gradient"
                checked += 1
    assert sum(p.numel() for p in model.encoder.parameters() if p.grad is not None) > 0
    assert checked > 10


@pytest.mark.parametrize("task", ["regression", "scalar_regression"])
def test_tasks_the_factory_lacks_are_refused_clearly(task):
    """TerraTorch < 1.2 has no scalar_regression, 1.0 no num_outputs: our error, not the factory's."""
    decoder = "IdentityDecoder" if task == "scalar_regression" else "FCNDecoder"
    build = functools.partial(build_model, "internvl2_5_4b", decoder, task, preset="tiny", in_chans=3, num_outputs=2)
    if task in factory_tasks() and factory_takes_num_outputs():
        assert build().train()(torch.randn(2, 3, 28, 28)).output.shape[:2] == (2, 2)
    else:
        since = r"1\.2" if task not in factory_tasks() else r"1\.1"
        with pytest.raises(ConfigurationError, match=rf"needs TerraTorch >= {since}\."):
            build()


def test_decoder_and_task_names_get_suggestions():
    with pytest.raises(UnknownNameError, match="Did you mean 'UperNetDecoder'"):
        recommend(BACKBONES[0], "UperNetDecoda", preset="tiny")
    with pytest.raises(UnknownNameError, match="Did you mean 'segmentation'"):
        recommend(BACKBONES[0], task="segmentaion", preset="tiny")


def test_the_probe_catches_what_the_static_check_cannot_see():
    # MaxpoolToPyramidal with four features needs a grid divisible by 8; the 4 x 4 probe grid is not.
    chain = [
        {"name": "TokensToGrid", "patch_size": 16, "cls_token": False},
        {"name": "MaxpoolToPyramidal"},
    ]
    with pytest.raises(ConfigurationError, match="probe image") as caught:
        build_model(
            "granite_4_tiny",
            "UNetDecoder",
            necks=chain,
            decoder_kwargs={"channels": [8, 8, 8, 8]},
            num_classes=2,
            preset="tiny",
        )
    assert caught.value.__cause__ is not None
    build_model(
        "granite_4_tiny",
        "UNetDecoder",
        necks=chain,
        decoder_kwargs={"channels": [8, 8, 8, 8]},
        num_classes=2,
        preset="tiny",
        probe_size=128,
    )


# -- RecipeFactory: the YAML route that names only backbone and decoder ------------------------------------


def test_recipe_factory_takes_model_args_like_encoder_decoder_factory():
    from earthmind_compat.recipes import RecipeFactory

    model = RecipeFactory().build_model(
        "segmentation",
        backbone=BACKBONES[0],
        decoder="UNetDecoder",
        num_classes=3,
        backbone_preset="tiny",
        backbone_in_chans=2,
        backbone_padding="constant",
        head_dropout=0.1,
    )
    assert model(torch.randn(2, 2, 30, 44)).output.shape == (2, 3, 30, 44)
    assert model.padding == "constant"
    assert [type(m).__name__ for m in model.neck] == ["TokensToGrid", "LearnedInterpolateToPyramidal"]
    with pytest.raises(ConfigurationError, match="Did you mean 'num_classes'"):
        RecipeFactory().build_model("segmentation", backbone=BACKBONES[0], num_clases=2, backbone_preset="tiny")


@pytest.mark.registry
def test_a_task_builds_through_the_registered_recipe_factory():
    from terratorch.registry import MODEL_FACTORY_REGISTRY
    from terratorch.tasks import SemanticSegmentationTask

    assert "RecipeFactory" in MODEL_FACTORY_REGISTRY, "register_all must register RecipeFactory"
    task = SemanticSegmentationTask(
        model_factory="RecipeFactory",
        model_args={
            "backbone": BACKBONES[0],
            "decoder": "UperNetDecoder",
            "num_classes": 2,
            "backbone_preset": "tiny",
            "backbone_in_chans": 3,
        },
        loss="ce",
        ignore_index=-1,
    )
    assert task.model(torch.randn(2, 3, 56, 56)).output.shape == (2, 2, 56, 56)
