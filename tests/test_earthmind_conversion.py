"""EarthMind's released key layout -> native classes: strict key map and forward equivalence.

The checkpoints are written by ``earthmind_reference.write_remote_checkpoint`` in the layout of EarthMind's
release (remote-code Sa2VA / InternViT names, fused qkv, two safetensors shards, a ``sa2va_chat`` config),
and the reference computes the remote forward, so the converted model is compared against the original.
"""

from __future__ import annotations

import json

import pytest
import torch
from earthmind_reference import TINY_VISION, TINY_VISION_QK_NORM, write_remote_checkpoint
from safetensors.torch import load_file, save_file
from terratorch.registry import BACKBONE_REGISTRY

from earthmind_compat import weights
from earthmind_compat.backbones import convert
from earthmind_compat.backbones.convert import KEY_RULES, convert_checkpoint, remote_settings
from earthmind_compat.backbones.earthmind import earthmind_checkpoint_parts
from earthmind_compat.backbones.loader import LAYOUTS, expected_shapes
from earthmind_compat.errors import UnsafeCheckpointError, WeightsError

pytestmark = pytest.mark.registry
VISION = {"layer_norm": TINY_VISION, "qk_norm": TINY_VISION_QK_NORM}


@pytest.fixture(scope="module", params=sorted(VISION))
def remote(request, tmp_path_factory):
    """``(directory, reference model)`` for a 4B-like and a qk-normalised (6B-like) tiny release."""
    directory = tmp_path_factory.mktemp(f"earthmind_{request.param}")
    return directory, write_remote_checkpoint(directory, VISION[request.param])


def converted(directory, **kwargs):
    kwargs.setdefault("modalities", {"sar": 3, "optical": 3})
    kwargs.setdefault("with_projector", True)
    return BACKBONE_REGISTRY.build("earthmind_v1", weights=str(directory), **kwargs).eval()


@pytest.mark.parametrize("size", [56, 84])
def test_converted_forward_equals_the_original_layout(remote, size):
    directory, reference = remote
    model = converted(directory, out_indices=[0, 1, 2])
    generator = torch.Generator().manual_seed(size)
    sar, optical = (torch.randn(2, 3, size, size, generator=generator) for _ in range(2))
    with torch.no_grad():
        ours = model.forward_modalities({"sar": sar, "optical": optical})
        tokens = reference.generate_multi_tokens(sar, optical)  # the release's inference (fusion="concat")
        states = reference.vision_model.hidden_states(optical)
    assert (ours.sequence() - tokens).abs().max() <= 1e-5
    assert ours.fusion.gates is None
    for layer, feature in zip([0, 1, 2], ours.layers["optical"], strict=True):
        assert (feature - states[layer + 1][:, 1:]).abs().max() <= 1e-5
    grid = model.features(ours)[-1]  # the TerraTorch feature holds the same values per position
    assert torch.equal(grid, torch.cat(ours.fusion.tokens, dim=-1))


def test_select_layer_picks_the_projected_layer(tmp_path):
    reference = write_remote_checkpoint(tmp_path / "ckpt", TINY_VISION, select_layer=2)  # hidden_states[2]
    model = converted(tmp_path / "ckpt")
    assert model.projector_layer == 1
    x = {"sar": torch.randn(1, 3, 56, 56), "optical": torch.randn(1, 3, 56, 56)}
    with torch.no_grad():
        expected = reference.generate_multi_tokens(*x.values())
        assert (model.forward_modalities(x).sequence() - expected).abs().max() <= 1e-5


def test_swapping_exchanges_halves_because_the_training_gate_is_symmetric(remote):
    """With the released weights both modalities share one kernel; the gate form is symmetric in the two."""
    model = converted(remote[0], fusion="gate")
    a, b = torch.randn(1, 3, 56, 56), torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        straight = model.forward_modalities({"sar": a, "optical": b}).fusion
        swapped = model.forward_modalities({"sar": b, "optical": a}).fusion
    assert torch.allclose(straight.gates[0], straight.gates[1], atol=1e-6)
    assert torch.allclose(straight.tokens[0], swapped.tokens[1], atol=1e-6)
    assert not torch.allclose(straight.sequence(), swapped.sequence(), atol=1e-4)


def test_named_bands_reuse_the_released_kernel(remote):
    directory, reference = remote
    model = converted(directory, modalities={"S1GRD": ["VV"], "S2L2A": ["BLUE", "GREEN", "RED"]})
    vv, rgb = torch.randn(1, 1, 56, 56), torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ours = model.forward_modalities({"S1GRD": vv, "S2L2A": rgb.flip(1)})  # the datamodule gives B, G, R
        tokens = reference.generate_multi_tokens(vv.repeat(1, 3, 1, 1), rgb)  # EarthMind saw SAR as grey RGB
    assert (ours.sequence() - tokens).abs().max() <= 1e-5


def test_without_projector_only_the_tower_is_kept(remote):
    directory, reference = remote
    model = converted(directory, modalities=None, in_chans=3, with_projector=False, out_indices=[-1])
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert (model(x)[0] - reference.vision_model.hidden_states(x)[-1][:, 1:]).abs().max() <= 1e-5
    assert model.projector is None and model.gate is None


# -- strictness of the key map ------------------------------------------------------------------------------


def _expected(settings):
    return expected_shapes(earthmind_checkpoint_parts, settings.vision, LAYOUTS["sa2va_chat"].parts)


@pytest.fixture(scope="module")
def both_checkpoints(tmp_path_factory):
    out = []
    for name, vision in sorted(VISION.items()):
        directory = tmp_path_factory.mktemp(f"strict_{name}")
        write_remote_checkpoint(directory, vision)
        config = json.loads((directory / "config.json").read_text())
        checkpoint = weights.CheckpointFiles(directory, config=config)
        out.append((checkpoint, _expected(remote_settings(config, directory))))
    return out


def test_full_key_map_consumes_every_tensor_and_fills_every_parameter(both_checkpoints):
    for checkpoint, expected in both_checkpoints:
        state = convert_checkpoint(checkpoint, expected)
        assert set(state) == set(expected)
        plan = convert.plan_keys(checkpoint.keys)
        assert not plan.unmatched
        assert {k.split(".")[0] for k in plan.skipped} == {"language_model", "grounding_encoder", "text_hidden_fcs"}


@pytest.mark.parametrize("removed", range(len(KEY_RULES)), ids=[r.pattern[:48] for r in KEY_RULES])
def test_removing_any_single_rule_fails_the_conversion(both_checkpoints, removed):
    rules = KEY_RULES[:removed] + KEY_RULES[removed + 1 :]
    failures = []
    for checkpoint, expected in both_checkpoints:
        try:
            convert_checkpoint(checkpoint, expected, rules)
        except WeightsError as error:
            failures.append(str(error))
    assert failures, f"dropping rule {KEY_RULES[removed].pattern!r} went unnoticed"
    assert all("missing" in f or "unexpected" in f for f in failures)


def _rewrite(directory, tmp_path, edit_tensors=None, edit_config=None):
    target = tmp_path / "edited"
    target.mkdir()
    for path in directory.glob("*.safetensors"):
        tensors = load_file(str(path))
        if edit_tensors is not None:
            edit_tensors(tensors)
        save_file(tensors, str(target / path.name))
    config = json.loads((directory / "config.json").read_text())
    if edit_config is not None:
        edit_config(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("edit_tensors", "edit_config", "message"),
    [
        (lambda t: t.pop("vision_model.encoder.layers.1.ls1", None), None, r"missing \[.*layer\.1\.lambda_1"),
        (
            lambda t: (
                t.update({"vision_model.encoder.layers.0.attn.rope": torch.zeros(2)}) if "mlp1.0.weight" in t else None
            ),
            None,
            r"unexpected \['vision_model\.encoder\.layers\.0\.attn\.rope'\]",
        ),
        (None, lambda c: c["vision_config"].update(qkv_bias=False), r"unexpected \[.*attn\.qkv\.bias"),
        (None, lambda c: c["vision_config"].update(num_hidden_layers=2), r"unexpected \[.*layers\.2\."),
        (None, lambda c: c["vision_config"].update(num_hidden_layers=4), r"missing \[.*layer\.3\."),
        (None, lambda c: c["llm_config"].update(hidden_size=16), r"mlp1\.3\.weight -> projector\.linear_2\.weight"),
        (None, lambda c: c.update(ps_version="v1"), "ps_version"),
        (None, lambda c: c.update(model_type="internvl_chat"), r"holds no cross-modal gate"),
        (None, lambda c: c.update(model_type="qwen2_vl"), "UnsafeCheckpointError"),
        (None, lambda c: c.pop("vision_config"), "no 'vision_config'"),
    ],
    ids=[
        "missing",
        "unexpected",
        "qkv-bias-trap",
        "fewer-layers",
        "more-layers",
        "shape",
        "ps-v1",
        "internvl-type-with-sam2",
        "other-type-with-remote-code",
        "config",
    ],
)
def test_mismatched_checkpoints_are_refused_with_the_keys(tmp_path, edit_tensors, edit_config, message):
    directory = tmp_path / "original"
    write_remote_checkpoint(directory, TINY_VISION)
    edited = _rewrite(directory, tmp_path, edit_tensors, edit_config)
    if message == "UnsafeCheckpointError":  # auto_map of a model type that is not read as data: never run
        with pytest.raises(UnsafeCheckpointError, match="never sets trust_remote_code"):
            converted(edited)
        return
    with pytest.raises(WeightsError, match=message):
        converted(edited)


@pytest.mark.reliability
def test_no_remote_code_runs_and_the_language_model_is_not_read(tmp_path, monkeypatch):
    directory = tmp_path / "ckpt"
    write_remote_checkpoint(directory, TINY_VISION)
    marker = tmp_path / "remote-code-ran"
    (directory / "configuration_earthmind_chat.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (directory / "modeling_earthmind_chat.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    requested: list[str] = []
    original = weights.CheckpointFiles.load

    def spy(self, keys):
        keys = list(keys)
        requested.extend(keys)
        return original(self, keys)

    monkeypatch.setattr(weights.CheckpointFiles, "load", spy)
    converted(directory)
    assert not marker.exists()
    assert requested and not [k for k in requested if not k.startswith(("vision_model.", "mlp1.", "local_query"))]
