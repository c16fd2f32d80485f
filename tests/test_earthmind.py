"""earthmind_v1: SAR + optical input conventions, fusion, shapes, errors, presets and a training step."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from packaging.version import Version
from terratorch.models import EncoderDecoderFactory
from terratorch.registry import BACKBONE_REGISTRY

from earthmind_compat.errors import ConfigurationError, InputError

TERRATORCH_VERSION = Version(version("terratorch"))

SAR_OPTICAL = {"S1GRD": ["VV", "VH"], "S2L2A": ["BLUE", "GREEN", "RED", "NIR_NARROW"]}


def build(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("preset", "tiny")
    return BACKBONE_REGISTRY.build("earthmind_v1", **kwargs).eval()


def sar_optical(batch=2, size=56, seed=0, channels=(2, 4)):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(batch, c, size, size, generator=generator)
        for name, c in zip(SAR_OPTICAL, channels, strict=True)
    }


# -- registry layer -----------------------------------------------------------------------------------------


@pytest.mark.registry
def test_builds_by_name_with_sar_and_optical():
    model = build(modalities=SAR_OPTICAL, with_projector=True)
    with torch.no_grad():
        features = model(sar_optical(), some_batch_key="ignored")
    assert model.out_channels == [2 * 32] * 4 + [2 * 64]  # both modalities side by side
    assert [tuple(f.shape) for f in features] == [(2, 16, 64)] * 4 + [(2, 4, 128)]
    assert model.gate is not None and model.aux_patch_embeddings is not None
    assert model.in_chans == 6 and model.bands == ["VV", "VH", "BLUE", "GREEN", "RED", "NIR_NARROW"]


@pytest.mark.registry
def test_stacked_tensor_is_split_by_band_name():
    model = build(modalities=SAR_OPTICAL, with_projector=True)
    inputs = sar_optical()
    order = ["RED", "VH", "NIR_NARROW", "BLUE", "VV", "GREEN"]  # a datamodule's band order
    named = {b: inputs["S1GRD"][:, i] for i, b in enumerate(SAR_OPTICAL["S1GRD"])}
    named |= {b: inputs["S2L2A"][:, i] for i, b in enumerate(SAR_OPTICAL["S2L2A"])}
    stacked = torch.stack([named[b] for b in order], dim=1)
    shuffled = build(modalities=SAR_OPTICAL, bands=order, with_projector=True)
    shuffled.load_state_dict(model.state_dict())
    with torch.no_grad():
        from_dict, from_stack = model(inputs), shuffled(stacked)
        by_position = model(torch.cat([inputs["S1GRD"], inputs["S2L2A"]], dim=1))
    for a, b, c in zip(from_dict, from_stack, by_position, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.registry
def test_single_sensor_path_has_no_gate_and_takes_a_tensor_or_a_dict():
    model = build(modalities={"S2L2A": 4}, with_projector=True)
    plain = build(in_chans=4, with_projector=True)
    x = torch.randn(2, 4, 56, 56)
    with torch.no_grad():
        from_dict, from_tensor, from_plain = model({"S2L2A": x}), model(x), plain(x)
    assert model.gate is None and model.aux_patch_embeddings is None
    assert model.out_channels == [32] * 4 + [64]
    for a, b, c in zip(from_dict, from_tensor, from_plain, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.registry
@pytest.mark.parametrize("stacked", [False, True], ids=["dict", "stacked-bands"])
def test_factory_segmentation_with_sar_and_optical(stacked):
    bands = [b for bands in SAR_OPTICAL.values() for b in bands]
    model = EncoderDecoderFactory().build_model(
        "segmentation",
        backbone="earthmind_v1",
        backbone_preset="tiny",
        backbone_modalities=SAR_OPTICAL,
        backbone_bands=bands if stacked else None,
        backbone_with_projector=True,
        necks=[{"name": "ReshapeTokensToImage", "remove_cls_token": False}],
        decoder="UperNetDecoder",
        decoder_channels=16,
        num_classes=3,
    )
    inputs = sar_optical(size=50)  # the factory pads 50 to 56, a multiple of 2 x 14
    x = torch.cat(list(inputs.values()), dim=1) if stacked else inputs
    if not stacked and Version("1.2") > TERRATORCH_VERSION:
        # TerraTorch before 1.2 pads only tensors, not dicts of modalities: our clear error, not a crash
        with pytest.raises(InputError, match="multiple of the patch size 14"):
            model(x)
        x = sar_optical(size=56)
        assert model(x).output.shape == (2, 3, 56, 56)
        return
    out = model(x).output
    assert out.shape == (2, 3, 50, 50)
    out.sum().backward()
    missing = [n for n, p in model.encoder.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


# -- shapes layer -------------------------------------------------------------------------------------------


@pytest.mark.shapes
@given(
    sar_bands=st.integers(1, 4),
    optical_bands=st.integers(1, 6),
    rows=st.integers(1, 4),
    cols=st.integers(1, 4),
    out_indices=st.lists(st.integers(-4, 3), min_size=1, max_size=4, unique_by=lambda i: i % 4),
    with_projector=st.booleans(),
    keep_cls=st.booleans(),
    fused=st.booleans(),
    gated=st.booleans(),
)
def test_shapes_agree_with_out_channels(
    sar_bands, optical_bands, rows, cols, out_indices, with_projector, keep_cls, fused, gated
):
    keep_cls = keep_cls and not with_projector
    modalities = {"sar": sar_bands, "optical": optical_bands} if fused else {"optical": optical_bands}
    fusion = "gate" if gated and fused and with_projector else "concat"
    model = build(
        modalities=modalities,
        out_indices=out_indices,
        with_projector=with_projector,
        keep_cls_token=keep_cls,
        fusion=fusion,
    )
    height, width = 28 * rows, 28 * cols  # even token grids
    inputs = {name: torch.randn(1, c, height, width) for name, c in modalities.items()}
    with torch.no_grad():
        features = model(inputs)
    tokens = (height // 14) * (width // 14)
    expected = [(1, tokens + int(keep_cls), c) for c in model.out_channels[: len(out_indices)]]
    if with_projector:
        expected.append((1, tokens // 4, model.out_channels[-1]))
    assert [tuple(f.shape) for f in features] == expected
    assert model.out_channels[0] == 32 * len(modalities)


# -- fusion: "concat" (the release's inference, default) and "gate" (the training-time gating, opt-in) --------


@pytest.mark.numerics
def test_default_fusion_hands_on_the_projected_tokens_unchanged():
    model = build(modalities={"S1GRD": 3, "S2L2A": 3}, with_projector=True)
    assert model.fusion_mode == "concat"
    with torch.no_grad():
        output = model.forward_modalities(sar_optical(channels=(3, 3)))
    sar, optical = output.projected["S1GRD"], output.projected["S2L2A"]
    assert output.fusion.gates is None
    assert torch.equal(output.sequence(), torch.cat([sar, optical], dim=1))  # per image: SAR then optical
    assert torch.equal(model.features(output)[-1], torch.cat([sar, optical], dim=-1))  # per position


@pytest.mark.numerics
@given(seed=st.integers(0, 2**16), scale=st.floats(0.1, 3.0), size=st.sampled_from([28, 56, 84]))
def test_gates_lie_strictly_between_zero_and_one(seed, scale, size):
    model = build(modalities={"sar": 2, "optical": 3}, with_projector=True, fusion="gate")
    generator = torch.Generator().manual_seed(seed)
    inputs = {n: scale * torch.randn(2, c, size, size, generator=generator) for n, c in (("sar", 2), ("optical", 3))}
    with torch.no_grad():
        output = model.forward_modalities(inputs)
    sar, optical = output.projected["sar"], output.projected["optical"]
    for gate, tokens, other, gated in zip(
        output.fusion.gates, (sar, optical), (optical, sar), output.fusion.tokens, strict=True
    ):
        assert gate.shape == tokens.shape[:2]
        assert bool(((gate > 0) & (gate < 1)).all()), (gate.min(), gate.max())
        # independently of CrossModalGate.scores: each learned query weighs the elementwise product of the pair
        logits = sum(((tokens * other) * query).sum(dim=-1) for query in model.gate.local_query)
        assert torch.allclose(gate, 1 / (1 + torch.exp(-logits)), rtol=1e-5, atol=1e-6)
        assert torch.allclose(gated, tokens * gate.unsqueeze(-1))
    # the score is a symmetric bilinear form: both modalities get the same gate at a position
    assert torch.allclose(*output.fusion.gates)


@pytest.mark.numerics
@pytest.mark.parametrize("fusion", ["concat", "gate"])
def test_swapping_sar_and_optical_changes_the_output(fusion):
    model = build(modalities={"sar": 3, "optical": 3}, with_projector=True, fusion=fusion)
    # one patch kernel for both (as in the release), so only the model's treatment of the roles can differ
    model.aux_patch_embeddings.load_state_dict(model.model.embeddings.patch_embeddings.state_dict())
    inputs = sar_optical(channels=(3, 3))
    sar, optical = inputs.values()
    with torch.no_grad():
        straight = model({"sar": sar, "optical": optical})
        swapped = model({"sar": optical, "optical": sar})
    for a, b in zip(straight, swapped, strict=True):
        assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.numerics
def test_gating_changes_the_projected_tokens():
    model = build(modalities={"S1GRD": 3, "S2L2A": 3}, with_projector=True, fusion="gate")
    with torch.no_grad():
        output = model.forward_modalities(sar_optical(channels=(3, 3)))
        ungated = torch.cat([output.projected["S1GRD"], output.projected["S2L2A"]], dim=-1)
        assert not torch.allclose(model.features(output)[-1], ungated, atol=1e-4)
        model.gate.local_query.mul_(1e3)  # saturated queries push gates towards 0 or 1
        saturated = model.forward_modalities(sar_optical(channels=(3, 3))).fusion.gates[0]
    assert float(((saturated < 1e-3) | (saturated > 1 - 1e-3)).float().mean()) > 0.5


# -- errors -------------------------------------------------------------------------------------------------


@pytest.mark.reliability
def test_missing_modality_is_a_clear_error_naming_the_single_sensor_path():
    model = build(modalities=SAR_OPTICAL)
    optical_only = {"S2L2A": sar_optical()["S2L2A"]}
    with pytest.raises(InputError, match=r"missing \['S1GRD'\].*modalities=\{'S2L2A'"):
        model(optical_only)
    single = build(modalities={"S2L2A": SAR_OPTICAL["S2L2A"]})  # the documented single-sensor path
    with torch.no_grad():
        assert [tuple(f.shape) for f in single(optical_only)] == [(2, 16, 32)] * 4


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({**sar_optical(), "DEM": torch.randn(2, 1, 56, 56)}, r"unexpected \['DEM'\]"),
        ({"S1GRD": torch.randn(2, 2, 56, 56), "S2L2A": torch.randn(2, 4, 84, 84)}, "different image sizes"),
        ({"S1GRD": torch.randn(2, 3, 56, 56), "S2L2A": torch.randn(2, 4, 56, 56)}, "'S1GRD' has 3 bands"),
        ({"S1GRD": torch.randn(2, 2, 56, 50), "S2L2A": torch.randn(2, 4, 56, 50)}, "multiple of the patch size"),
        ({"S1GRD": torch.randn(1, 2, 56, 56), "S2L2A": torch.randn(2, 4, 56, 56)}, "different batch sizes"),
        ({"S1GRD": torch.zeros(2, 2, 56, 56, dtype=torch.int16), "S2L2A": torch.randn(2, 4, 56, 56)}, "dtype"),
        (torch.randn(2, 5, 56, 56), "5 input bands"),
    ],
    ids=["extra", "sizes", "bands", "patch", "batch", "dtype", "stacked-bands"],
)
def test_bad_multimodal_input_is_a_clear_error(inputs, message):
    with pytest.raises(InputError, match=message):
        build(modalities=SAR_OPTICAL)(inputs)


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modalities": {"a": 1, "b": 2, "c": 3}}, "one or two modalities"),
        ({"modalities": ["S1GRD", "S2L2A"]}, "must map each modality"),
        ({"modalities": {"S1GRD": "VV"}}, "band names or its band count"),
        ({"modalities": SAR_OPTICAL, "in_chans": 5}, "in_chans=5 disagrees"),
        ({"modalities": SAR_OPTICAL, "bands": ["VV", "VH", "RED"]}, "must be exactly the modalities' bands"),
        ({"modalities": {"a": ["B1"], "b": ["B2", "B3"]}, "bands": ["B1", "B1", "B2"]}, "repeats"),
        ({"modalities": {"a": ["B1"], "b": ["B1", "B2"]}}, "share band names"),
        ({"modalities": {"a": ["B1"], "b": ["B1", "B2"]}, "bands": ["B1", "B2", "B3"]}, "share band names"),
        ({"with_projector": True, "keep_cls_token": True}, "keep_cls_token=False"),
        ({"modality": SAR_OPTICAL}, "Did you mean 'modalities'"),
        ({"fusion": 1}, r"fusion must be a string.*got 1 \(int\).*'concat'.*'gate'"),
        ({"fusion": None}, r"fusion must be a string.*got None.*'concat'.*'gate'"),
        ({"fusion": "gated"}, r"Unknown fusion 'gated'. Did you mean 'gate'\?.*'concat'.*'gate'"),
        ({"fusion": "gate", "modalities": SAR_OPTICAL}, "needs with_projector=True and two modalities"),
        ({"fusion": "gate", "with_projector": True, "in_chans": 3}, "needs with_projector=True and two modalities"),
    ],
)
def test_bad_configuration_is_a_clear_error_through_the_registry(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        BACKBONE_REGISTRY.build("earthmind_v1", preset="tiny", **kwargs)


@pytest.mark.reliability
def test_projector_needs_an_even_grid():
    with pytest.raises(InputError, match="multiples of 28 px"):
        build(modalities=SAR_OPTICAL, with_projector=True)(sar_optical(size=42))


# -- presets ------------------------------------------------------------------------------------------------


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.registry
def test_full_preset_matches_published_sizes():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = BACKBONE_REGISTRY.build(
            "earthmind_v1", preset="full", modalities={"sar": 3, "optical": 3}, with_projector=True
        )
        # EarthMind-4B's language model, Qwen2.5-3B (output head untied in InternVL2.5-4B's checkpoint)
        language_model = Qwen2ForCausalLM(
            Qwen2Config(
                hidden_size=2048,
                num_hidden_layers=36,
                num_attention_heads=16,
                num_key_value_heads=2,
                intermediate_size=11008,
                vocab_size=151936,
                tie_word_embeddings=False,
            )
        )
        gated = BACKBONE_REGISTRY.build(
            "earthmind_v1", preset="full", modalities={"sar": 3, "optical": 3}, with_projector=True, fusion="gate"
        )
    vision, projector = _count(model.model), _count(model.projector)
    assert abs(vision - 304e6) / 304e6 < 0.01, vision  # InternViT-300M
    assert abs(projector - 12.6e6) / 12.6e6 < 0.01, projector  # 4096 -> 2048 -> 2048
    assert _count(model.gate) == 0 and model.gate.local_query.shape == (2, 2048)  # kept, unused, as a buffer
    assert _count(gated.gate) == 2 * 2048  # local_query, trainable with fusion="gate"
    assert _count(model.aux_patch_embeddings) == 1024 * 3 * 14 * 14 + 1024  # the optical copy of the kernel
    image_side = vision + projector  # InternVL2.5-4B has no local_query
    assert abs(image_side + _count(language_model) - 3.71e9) / 3.71e9 < 0.01  # InternVL2.5-4B: about 3.71 B
    assert model.out_channels == [2 * 1024] * 4 + [2 * 2048]


# -- a training step through TerraTorch's task --------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("fusion", ["concat", "gate"])
def test_one_training_step_of_a_segmentation_task_on_sar_and_optical(fusion, tmp_path):
    import lightning.pytorch as pl
    from terratorch.tasks import SemanticSegmentationTask
    from torch.utils.data import DataLoader

    def segmentation_task(fusion: str, seed: int) -> SemanticSegmentationTask:
        torch.manual_seed(seed)
        return SemanticSegmentationTask(
            model_factory="EncoderDecoderFactory",
            model_args={
                "backbone": "earthmind_v1",
                "backbone_preset": "tiny",
                "backbone_modalities": SAR_OPTICAL,
                "backbone_with_projector": True,
                "backbone_fusion": fusion,
                "necks": [{"name": "ReshapeTokensToImage", "remove_cls_token": False}],
                "decoder": "UperNetDecoder",
                "decoder_channels": 16,
                "num_classes": 2,
            },
            loss="ce",
            ignore_index=-1,
            lr=1e-3,
        )

    task = segmentation_task(fusion, seed=0)
    generator = torch.Generator().manual_seed(0)
    samples = [
        {
            "image": {
                "S1GRD": torch.randn(2, 56, 56, generator=generator),
                "S2L2A": torch.randn(4, 56, 56, generator=generator),
            },
            "mask": torch.randint(0, 2, (56, 56), generator=generator),
        }
        for _ in range(2)
    ]
    before = {n: p.detach().clone() for n, p in task.model.encoder.named_parameters()}
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(task, train_dataloaders=DataLoader(samples, batch_size=2))
    assert trainer.global_step == 1
    after = dict(task.model.encoder.named_parameters())
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"not updated by the step: {unchanged}"
    assert "aux_patch_embeddings.projection.weight" in before
    # trained with the gate; with "concat" kept (in the state dict, for checkpoints) but not a parameter
    assert ("gate.local_query" in before) == (fusion == "gate")
    assert "gate.local_query" in task.model.encoder.state_dict()

    # the Lightning checkpoint reloads strictly into a fresh task of the same mode (same outputs) and of the other
    trainer.save_checkpoint(tmp_path / "step.ckpt")
    state = torch.load(tmp_path / "step.ckpt", weights_only=True)["state_dict"]
    batch = {name: torch.stack([s["image"][name] for s in samples]) for name in SAR_OPTICAL}
    task.eval()
    for mode in ("concat", "gate"):
        fresh = segmentation_task(mode, seed=1).eval()
        fresh.load_state_dict(state, strict=True)
        assert torch.equal(fresh.model.encoder.gate.local_query, task.model.encoder.gate.local_query)
        if mode == fusion:
            with torch.no_grad():
                assert torch.equal(fresh.model(batch).output, task.model(batch).output)
