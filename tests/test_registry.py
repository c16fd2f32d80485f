"""Layer 1: every backbone builds by name through TerraTorch, and the loading path round-trips."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import transformers
from packaging.version import Version
from terratorch.models import EncoderDecoderFactory
from terratorch.registry import BACKBONE_REGISTRY, TERRATORCH_BACKBONE_REGISTRY

import earthmind_compat
from earthmind_compat.backbones import BACKBONE_CLASSES
from earthmind_compat.builders import BACKBONE_BUILDERS
from earthmind_compat.check import tiny_input
from earthmind_compat.compat import call_with_hidden_states
from earthmind_compat.errors import ConfigurationError, RegistryConflictError, UnknownNameError

pytestmark = pytest.mark.registry
NAMES = sorted(BACKBONE_BUILDERS)


def ours_in_registry() -> set[str]:
    return {
        name
        for name in TERRATORCH_BACKBONE_REGISTRY
        if getattr(TERRATORCH_BACKBONE_REGISTRY[name], "__module__", "").startswith("earthmind_compat")
    }


def test_registered_set_equals_declared_set():
    assert ours_in_registry() == set(BACKBONE_BUILDERS) == set(earthmind_compat.BACKBONES)


@pytest.mark.parametrize("name", NAMES)
def test_builds_by_name_and_runs(name):
    model = BACKBONE_REGISTRY.build(name, preset="tiny", in_chans=4).eval()
    x = tiny_input(name)
    with torch.no_grad():
        features = model(x, some_batch_key="ignored")
    rows, cols = model.grid_size(*x.shape[-2:])
    assert [f.shape for f in features] == [
        torch.Size([2, rows * cols + int(model.has_cls_token), c]) for c in model.out_channels
    ]
    assert model.has_cls_token == BACKBONE_CLASSES[name].spec.cls_token
    assert isinstance(model.patch_size, int)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("decoder", ["UperNetDecoder", "FCNDecoder"])
def test_builds_in_encoder_decoder_factory(name, decoder):
    model = EncoderDecoderFactory().build_model(
        "segmentation",
        backbone=name,
        backbone_preset="tiny",
        backbone_bands=["BLUE", "GREEN", "RED", "NIR_NARROW"],
        necks=[
            {"name": "ReshapeTokensToImage", "remove_cls_token": BACKBONE_CLASSES[name].spec.cls_token},
            {"name": "LearnedInterpolateToPyramidal"},
        ],
        decoder=decoder,
        num_classes=3,
    )
    x = tiny_input(name, batch=2)  # batch 2: UperNet's pooling BatchNorm needs > 1 value in training
    out = model(x).output
    assert out.shape == (2, 3, *x.shape[-2:])
    out.sum().backward()
    grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads), "every backbone parameter must get a gradient"


def test_register_all_is_idempotent_and_accepts_a_reloaded_copy_of_ours(replaced_registry_entry):
    before = set(TERRATORCH_BACKBONE_REGISTRY)
    earthmind_compat.register_all()
    assert set(TERRATORCH_BACKBONE_REGISTRY) == before
    # what importlib.reload leaves behind: another function object with our module and qualified name
    ours = TERRATORCH_BACKBONE_REGISTRY["granite_4_tiny"]
    reloaded = types.FunctionType(ours.__code__, ours.__globals__, ours.__name__, ours.__defaults__, ours.__closure__)
    reloaded.__qualname__, reloaded.__module__ = ours.__qualname__, ours.__module__
    replaced_registry_entry("granite_4_tiny", reloaded)
    earthmind_compat.register_all()
    assert set(TERRATORCH_BACKBONE_REGISTRY) == before
    assert ours_in_registry() == set(BACKBONE_BUILDERS)


def test_foreign_object_under_our_name_is_an_error(replaced_registry_entry):
    def granite_4_tiny(**kwargs):  # somebody else's model with our name
        return None

    replaced_registry_entry("granite_4_tiny", granite_4_tiny)
    with pytest.raises(RegistryConflictError, match="granite_4_tiny"):
        earthmind_compat.register_all()


@pytest.mark.parametrize("name", NAMES)
def test_constructor_errors_survive_terratorch_registry(name):
    """Errors inside our constructors must reach the user, not become 'could not be instantiated'."""
    with pytest.raises(UnknownNameError, match="Did you mean 'tiny'"):
        BACKBONE_REGISTRY.build(name, preset="tiny_")
    with pytest.raises(ConfigurationError, match="disagrees"):
        BACKBONE_REGISTRY.build(name, preset="tiny", in_chans=4, bands=["RED", "GREEN", "BLUE"])


def test_build_backbone_suggests_close_names():
    with pytest.raises(UnknownNameError, match="Did you mean 'internvl2_5_4b'"):
        earthmind_compat.build_backbone("internvl25_4b", preset="tiny")


# -- presets: full dimensions against the published figures ------------------------------------------------


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_internvl_full_preset_matches_published_size():
    with torch.device("meta"):
        model = BACKBONE_REGISTRY.build("internvl2_5_4b", preset="full", with_projector=True)
    vision, projector = _count(model.model), _count(model.projector)
    assert abs(vision - 304e6) / 304e6 < 0.01, vision  # InternViT-300M: ~304 M
    assert abs(projector - 12.6e6) / 12.6e6 < 0.01, projector  # 4096 -> 2048 -> 2048 MLP: ~12.6 M
    assert model.out_channels[-1] == 2048 and model.out_channels[0] == 1024


def test_internvit_6b_preset_matches_published_size():
    with torch.device("meta"):
        model = BACKBONE_REGISTRY.build("internvl2_5_4b", preset="internvit_6b")
    vision = _count(model.model)
    assert abs(vision - 5.54e9) / 5.54e9 < 0.01, vision  # InternViT-6B-448px-V2.5: 5,540 M
    assert model.out_indices == [10, 21, 32, 44]


def test_granite_full_preset_matches_published_size():
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridModel

    from earthmind_compat.backbones.granite import GRANITE_PRESETS

    settings = {k: v for k, v in GRANITE_PRESETS["full"].items() if k != "patch_size"}
    with torch.device("meta"):
        language_model = GraniteMoeHybridModel(GraniteMoeHybridConfig(**settings))
    total = _count(language_model)  # granite-4.0-h-tiny: 6.94 B with (tied) embeddings
    assert abs(total - 6.94e9) / 6.94e9 < 0.01, total
    with torch.device("meta"):
        backbone = BACKBONE_REGISTRY.build("granite_4_tiny", preset="full")
    dropped = language_model.embed_tokens.weight.numel() + language_model.norm.weight.numel()
    patch = _count(backbone.patch_embed)
    assert _count(backbone) == total - dropped + patch


# -- weights: the real loading path on tiny checkpoints ------------------------------------------------------


def test_internvl_vision_checkpoint_round_trip(tiny_internvl_vision_dir):
    directory, reference = tiny_internvl_vision_dir
    model = BACKBONE_REGISTRY.build("internvl2_5_4b", weights=str(directory), out_indices=[0, -1]).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = model(x)
        theirs = call_with_hidden_states(reference, x).hidden_states
    assert (ours[0] - theirs[1]).abs().max() <= 1e-5
    assert (ours[1] - theirs[-1]).abs().max() <= 1e-5


def test_internvl_full_checkpoint_loads_tower_and_projector(tiny_internvl_full_dir):
    directory, reference = tiny_internvl_full_dir
    model = BACKBONE_REGISTRY.build("internvl2_5_4b", weights=str(directory), with_projector=True).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        projected = model(x)[-1]
        expected = reference.model.get_image_features(
            pixel_values=x, vision_feature_layer=-1, vision_feature_select_strategy="default"
        )
    expected = getattr(expected, "pooler_output", expected)
    assert projected.shape == expected.shape == (2, 4, 64)
    assert (projected - expected).abs().max() <= 1e-5


def test_internvl_pixel_shuffle_matches_transformers_on_square_grids():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    from earthmind_compat.backbones.internvl import pixel_shuffle

    grid = torch.randn(2, 6, 6, 8)
    assert torch.equal(pixel_shuffle(grid), InternVLModel.pixel_shuffle(None, grid, 0.5))
    assert pixel_shuffle(torch.randn(1, 4, 6, 8)).shape == (1, 2, 3, 32)


def test_granite_checkpoint_round_trip(tiny_granite_dir):
    directory, reference = tiny_granite_dir
    model = BACKBONE_REGISTRY.build("granite_4_tiny", weights=str(directory), out_indices=[-1]).eval()
    theirs_state = reference.model.state_dict()
    ours_state = model.model.state_dict()
    assert set(ours_state) == set(theirs_state) - {"embed_tokens.weight", "norm.weight"}
    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in ours_state)


@pytest.mark.skipif(
    Version(transformers.__version__) < Version("5"),
    reason="the reference forward uses transformers 5.x's per-layer-type attention masks",
)
def test_granite_forward_equals_the_reference_model(tiny_granite_dir):
    directory, reference = tiny_granite_dir
    model = BACKBONE_REGISTRY.build("granite_4_tiny", weights=str(directory), out_indices=[-1]).eval()
    reference = copy.deepcopy(reference)
    reference.model.norm = torch.nn.Identity()  # our features are raw layer outputs
    for layer in reference.model.layers:  # the reference must be bidirectional too
        if getattr(layer, "self_attn", None) is not None:
            layer.self_attn.is_causal = False
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ours = model(x)[0]
        embeds = model.embed(x) / reference.config.embedding_multiplier
        mask = {"full_attention": None, "linear_attention": None}
        theirs = reference.model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    assert (ours - theirs.hidden_states[-1]).abs().max() <= 1e-5


def test_extra_bands_reuse_rgb_kernels(tiny_internvl_vision_dir):
    directory, reference = tiny_internvl_vision_dir
    rgb = reference.embeddings.patch_embeddings.projection.weight
    bands = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1"]
    model = BACKBONE_REGISTRY.build("internvl2_5_4b", weights=str(directory), bands=bands)
    kernel = model.model.embeddings.patch_embeddings.projection.weight
    scale = 3 / 5
    assert torch.allclose(kernel[:, 0], rgb[:, 2] * scale)  # BLUE is RGB channel 2
    assert torch.allclose(kernel[:, 2], rgb[:, 0] * scale)  # RED is RGB channel 0
    assert torch.allclose(kernel[:, 3], rgb.mean(1) * scale)
    same = BACKBONE_REGISTRY.build("internvl2_5_4b", weights=str(directory), bands=["RED", "GREEN", "BLUE"])
    assert torch.equal(same.model.embeddings.patch_embeddings.projection.weight, rgb)
    bgr = BACKBONE_REGISTRY.build("internvl2_5_4b", weights=str(directory), bands=["BLUE", "GREEN", "RED"])
    assert torch.equal(bgr.model.embeddings.patch_embeddings.projection.weight, rgb.flip(1))
