"""What the backbones promise beyond shapes: bidirectionality, CLS handling, layer choice, size freedom."""

from __future__ import annotations

import pytest
import torch
from terratorch.registry import BACKBONE_REGISTRY

pytestmark = pytest.mark.numerics


def _first_token_change(model, x: torch.Tensor) -> float:
    """How much the first patch token of the last feature moves when only the last patch changes."""
    changed = x.clone()
    changed[..., -model.patch_size :, -model.patch_size :] += 1.0
    with torch.no_grad():
        before, after = model(x)[-1], model(changed)[-1]
    first = int(model.has_cls_token)
    return float((before[:, first] - after[:, first]).abs().max())


def test_granite_attention_is_bidirectional(monkeypatch):
    from earthmind_compat.backbones import granite

    torch.manual_seed(0)
    # a single attention layer: the first token can only see the last one if attention is not causal
    model = BACKBONE_REGISTRY.build("granite_4_tiny", preset="tiny", out_indices=[1]).eval()
    x = torch.randn(1, 3, 32, 32)
    assert _first_token_change(model, x) > 1e-4
    run_layer = granite._run_layer

    def causal(layer, hidden, **kwargs):
        return run_layer(layer, hidden, **({**kwargs, "is_causal": True} if "is_causal" in kwargs else kwargs))

    monkeypatch.setattr(granite, "_run_layer", causal)
    assert _first_token_change(model, x) == 0.0  # the same check catches a causal attention


def test_granite_reversed_mamba_pass_lets_early_tokens_see_late_ones():
    torch.manual_seed(0)
    causal = BACKBONE_REGISTRY.build("granite_4_tiny", preset="tiny", out_indices=[0]).eval()
    both = BACKBONE_REGISTRY.build("granite_4_tiny", preset="tiny", out_indices=[0], bidirectional_mamba=True)
    both.load_state_dict(causal.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert _first_token_change(causal.eval(), x) == 0.0  # Mamba alone is causal
    assert _first_token_change(both.eval(), x) > 1e-4


@pytest.mark.parametrize("keep", [True, False])
def test_internvl_cls_token_is_explicit(keep):
    model = BACKBONE_REGISTRY.build("internvl2_5_4b", preset="tiny", keep_cls_token=keep).eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, 56, 56))
    assert model.has_cls_token is keep
    assert all(f.shape[1] == 16 + int(keep) for f in features)


@pytest.mark.parametrize("name", ["internvl2_5_4b", "granite_4_tiny"])
def test_out_indices_pick_the_requested_layers(name):
    torch.manual_seed(0)
    model = BACKBONE_REGISTRY.build(name, preset="tiny", out_indices=[-1, 0]).eval()
    everything = BACKBONE_REGISTRY.build(name, preset="tiny", out_indices=[0, 1, 2, 3]).eval()
    everything.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64 if name.startswith("granite") else 56, 64 if name.startswith("granite") else 56)
    with torch.no_grad():
        last, first = model(x)
        layers = everything(x)
    assert torch.equal(first, layers[0]) and torch.equal(last, layers[3])
    assert not torch.equal(first, last)


@pytest.mark.parametrize(("height", "width"), [(28, 28), (42, 70), (112, 56)])
def test_internvl_takes_sizes_other_than_pretraining(height, width):
    model = BACKBONE_REGISTRY.build("internvl2_5_4b", preset="tiny").eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, height, width))
    assert features[0].shape == (1, 1 + (height // 14) * (width // 14), 32)


@pytest.mark.parametrize(("height", "width"), [(28, 28), (112, 56), (56, 84)])
def test_internvl_projector_quarters_the_tokens(height, width):
    model = BACKBONE_REGISTRY.build("internvl2_5_4b", preset="tiny", with_projector=True).eval()
    with torch.no_grad():
        projected = model(torch.randn(1, 3, height, width))[-1]
    assert projected.shape == (1, (height // 14) * (width // 14) // 4, 64)


def test_internvl_projector_rejects_odd_grids_before_running():
    from earthmind_compat.errors import InputError

    model = BACKBONE_REGISTRY.build("internvl2_5_4b", preset="tiny", with_projector=True)
    with pytest.raises(InputError, match="multiples of 28 px"):
        model(torch.randn(1, 3, 42, 70))
