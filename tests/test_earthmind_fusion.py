"""EarthMind's two fusion modes against the independent reference, and checkpoints of either mode.

``fusion="concat"`` (default) must give what the release's inference (``generate_multi``) hands its language
model, ``fusion="gate"`` what the training class's gating gives (both written out in
``tests/earthmind_reference.py`` as EarthMind's code writes them), from the same tiny checkpoint in the
released layout. Each comparison also checks that its tolerance would catch the nearest wrong answer (optical
before SAR; a gate scaled by ``hidden ** -0.5``), so it cannot pass for the wrong reason.
"""

from __future__ import annotations

import pytest
import torch
from earthmind_reference import TINY_LLM_HIDDEN, TINY_VISION, write_remote_checkpoint
from safetensors.torch import load_file, save_file
from terratorch.registry import BACKBONE_REGISTRY

from earthmind_compat.backbones.fusion import FUSION_MODES, sequence_from_grid

TOLERANCE = 1e-5
MODALITIES = {"S1GRD": 3, "S2L2A": 3}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """``(directory, reference model)`` of a tiny checkpoint in EarthMind's released layout."""
    directory = tmp_path_factory.mktemp("earthmind_release")
    return directory, write_remote_checkpoint(directory, TINY_VISION, seed=3)


def pair(batch: int = 2, size: int = 56, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, 3, size, size, generator=generator) for name in MODALITIES}


def build(fusion: str, weights=None, seed: int = 0):
    torch.manual_seed(seed)
    kwargs = {"weights": str(weights)} if weights is not None else {"preset": "tiny"}
    return BACKBONE_REGISTRY.build(
        "earthmind_v1", modalities=MODALITIES, with_projector=True, fusion=fusion, **kwargs
    ).eval()


def largest(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.numerics
@pytest.mark.parametrize("size", [56, 84])
def test_concat_is_the_release_inference_sar_then_optical(release, size):
    directory, reference = release
    model = build("concat", directory)
    x = pair(size=size)
    with torch.no_grad():
        ours = model.forward_modalities(x)
        feature = model(x)[-1]
        expected = reference.generate_multi_tokens(x["S1GRD"], x["S2L2A"])
        wrong_order = reference.generate_multi_tokens(x["S2L2A"], x["S1GRD"])
    assert ours.fusion.gates is None
    assert largest(ours.sequence(), expected) <= TOLERANCE
    # the TerraTorch feature is the same values per position: [B, N, 2C] with SAR channels first
    assert largest(sequence_from_grid(feature), expected) <= TOLERANCE
    half = expected.shape[1] // 2
    assert largest(feature, torch.cat([expected[:, :half], expected[:, half:]], dim=-1)) <= TOLERANCE
    # the tolerance tells the release's order from optical-then-SAR
    assert largest(ours.sequence(), wrong_order) > 100 * TOLERANCE


@pytest.mark.numerics
@pytest.mark.parametrize("size", [56, 84])
def test_gate_is_the_training_code_formula(release, size):
    directory, reference = release
    model = build("gate", directory)
    x = pair(size=size, seed=1)
    with torch.no_grad():
        ours = model.forward_modalities(x)
        feature = model(x)[-1]
        tokens, sar_gate, optical_gate = reference.training_gate(x["S1GRD"], x["S2L2A"])
        # the nearest wrong formula: queries scaled by hidden ** -0.5 (commented out in the training code)
        unscaled = reference.local_query.detach().clone()
        reference.local_query.data.mul_(TINY_LLM_HIDDEN**-0.5)
        scaled_tokens, scaled_gate, _ = reference.training_gate(x["S1GRD"], x["S2L2A"])
        reference.local_query.data.copy_(unscaled)
    assert torch.equal(model.gate.local_query, reference.local_query)  # loaded from the checkpoint
    assert largest(ours.sequence(), tokens) <= TOLERANCE
    assert largest(ours.fusion.gates[0], sar_gate) <= TOLERANCE
    assert largest(ours.fusion.gates[1], optical_gate) <= TOLERANCE
    assert largest(sequence_from_grid(feature), tokens) <= TOLERANCE
    # the gates are neither all saturated nor all 1/2 here, so a wrong scale or order shows
    assert float(sar_gate.min()) > 0.05 and float(sar_gate.max()) < 0.95, (sar_gate.min(), sar_gate.max())
    assert largest(ours.fusion.gates[0], scaled_gate) > 100 * TOLERANCE
    assert largest(ours.sequence(), scaled_tokens) > 100 * TOLERANCE
    assert largest(ours.sequence(), torch.cat(tokens.chunk(2, dim=1)[::-1], dim=1)) > 100 * TOLERANCE


@pytest.mark.numerics
def test_modes_differ_only_by_the_gates(release):
    directory, _ = release
    concat, gate = build("concat", directory), build("gate", directory)
    x = pair(seed=2)
    with torch.no_grad():
        plain, gated = concat.forward_modalities(x), gate.forward_modalities(x)
    for a, b in zip(plain.layers.values(), gated.layers.values(), strict=True):  # same tower
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    for tokens, weighted, weights in zip(plain.fusion.tokens, gated.fusion.tokens, gated.fusion.gates, strict=True):
        assert torch.allclose(tokens * weights.unsqueeze(-1), weighted, atol=1e-6)
        assert not torch.allclose(tokens, weighted, atol=1e-3)


# -- checkpoints: local_query has one key in both modes --------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("saved_mode", sorted(FUSION_MODES))
@pytest.mark.parametrize("loaded_mode", sorted(FUSION_MODES))
def test_state_dict_round_trips_strictly_between_modes(saved_mode, loaded_mode, tmp_path):
    saved = build(saved_mode, seed=0)
    with torch.no_grad():
        saved.gate.local_query.mul_(0.5)  # as a fine-tune moves it (a buffer with "concat": set by hand)
    save_file(saved.state_dict(), str(tmp_path / "backbone.safetensors"))
    fresh = build(loaded_mode, seed=1)
    assert not torch.equal(fresh.gate.local_query, saved.gate.local_query)
    fresh.load_state_dict(load_file(str(tmp_path / "backbone.safetensors")), strict=True)
    assert torch.equal(fresh.gate.local_query, saved.gate.local_query)
    assert isinstance(fresh.gate.local_query, torch.nn.Parameter) == (loaded_mode == "gate")
    x = pair(seed=4)
    with torch.no_grad():
        if saved_mode == loaded_mode:
            for a, b in zip(saved(x), fresh(x), strict=True):
                assert torch.equal(a, b)
        else:  # same weights: the tower's layers agree, the fused feature differs by the gates only
            for a, b in zip(saved(x)[:-1], fresh(x)[:-1], strict=True):
                assert torch.equal(a, b)


@pytest.mark.numerics
@pytest.mark.parametrize("fusion", sorted(FUSION_MODES))
def test_released_local_query_is_loaded_in_both_modes(release, fusion):
    directory, reference = release
    model = build(fusion, directory)
    assert torch.equal(model.gate.local_query, reference.local_query.detach())
    assert ("gate.local_query" in dict(model.named_parameters())) == (fusion == "gate")
    assert "gate.local_query" in model.state_dict()


@pytest.mark.numerics
def test_concat_leaves_no_parameter_without_a_gradient():
    """An unused parameter would fail DDP's default ``find_unused_parameters=False``; the buffer cannot."""
    model = build("concat").train()
    sum(f.square().mean() for f in model(pair())).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert model.gate.local_query.grad is None and not model.gate.local_query.requires_grad
