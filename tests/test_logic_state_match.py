"""Pure logic of earthmind_compat.backbones.state_match: why a checkpoint does not fit, in one sentence.

State dicts here are small dicts of tensors written by hand with the key names bitsandbytes and peft use;
every message is checked against the sentence written out in full.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from earthmind_compat.backbones.state_match import (
    CheckpointMismatchError,
    base_key,
    check_state_matches,
    describe_mismatch,
    technique_of,
)

pytestmark = pytest.mark.reliability

NF4 = ".weight.quant_state.bitsandbytes__nf4"
FP4 = ".weight.quant_state.bitsandbytes__fp4"


def _t(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


# -- technique_of ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ([], "none"),
        (["blocks.0.fc.weight", "blocks.0.fc.bias"], "none"),
        (["blocks.0.fc.weight", "blocks.0.fc.SCB"], "int8"),
        (["blocks.0.fc" + NF4], "nf4"),
        (["blocks.0.fc" + FP4], "fp4"),
        (["blocks.0.fc" + NF4, "blocks.0.fc.weight.nested_absmax"], "nf4+dq"),
        (["a.lora_A.default.weight"], "lora"),
        (["a.lora_B.default.weight"], "lora"),
        (["a.SCB", "a.lora_B.default.weight"], "int8+lora"),
        (["a.lora_A.x", "e.nested_absmax", "d" + FP4, "c" + NF4, "b.SCB"], "int8+nf4+fp4+dq+lora"),
        # near misses: the marker must end the key (or be a whole path component for LoRA)
        (["a.SCB.weight", "a.SCBX", "a.weight.nested_absmax_", "lora_A.weight", "a.lora_Ax.weight"], "none"),
        (["a" + NF4 + ".x", "a.quant_state.bitsandbytes__nf4x"], "none"),
    ],
)
def test_technique_of(keys: list[str], expected: str) -> None:
    assert technique_of(keys) == expected
    assert technique_of(set(keys)) == expected


# -- base_key -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.weight"),
        ("blocks.0.fc.base_layer.weight", "blocks.0.fc.weight"),
        ("base_layer.weight", "base_layer.weight"),
        ("a.absmaxx", "a.absmaxx"),
        ("a.weight_formats", "a.weight_formats"),
        ("blocks.0.fc.lora_A.default.weight", None),
        ("blocks.0.fc.lora_embedding_B.default", None),
        ("a.weight.absmax", None),
        ("a.weight.quant_map", None),
        ("a.weight.nested_absmax", None),
        ("a.weight.nested_quant_map", None),
        ("a" + NF4, None),
        ("a" + FP4, None),
        ("a.SCB", None),
        ("a.weight_format", None),
        ("a.weight.absmax.0", None),
        ("a.SCB.x", None),
        ("a.weight_format.y", None),
    ],
)
def test_base_key(key: str, expected: str | None) -> None:
    assert base_key(key) == expected


# -- describe_mismatch ----------------------------------------------------------------------------------------

OWNER = "Backbone(preset='tiny')"
HEAD = f"This checkpoint does not match {OWNER}: "


def _own() -> dict[str, object]:
    return {
        "embed.proj.weight": _t(8, 3, 2, 2),
        "embed.proj.bias": _t(8),
        "blocks.0.fc.weight": _t(8, 8),
        "blocks.1.fc.weight": _t(8, 8),
        "norm.weight": _t(8),
    }


def test_a_matching_checkpoint_gives_no_message() -> None:
    assert describe_mismatch(OWNER, _own(), _own()) is None
    own = {**_own(), "extra_state": {"not": "a tensor"}}
    incoming = {**_own(), "extra_state": _t(5)}
    assert describe_mismatch(OWNER, incoming, own) is None


def test_technique_only_entries_that_name_no_technique_are_not_a_mismatch() -> None:
    own = {**_own(), "blocks.0.fc.weight.absmax": _t(4)}
    assert describe_mismatch(OWNER, _own(), own) is None


def test_another_model() -> None:
    incoming = {"other.a": _t(1), "other.b": _t(1), "other.c": _t(1), "other.d": _t(1), "norm.weight": _t(8)}
    message = describe_mismatch(OWNER, incoming, _own())
    assert message == (
        HEAD + "it holds another model (e.g. ['other.a', 'other.b', 'other.c']). Load it with the backbone it was "
        "trained with."
    )


def test_half_of_the_keys_in_common_is_still_the_same_model() -> None:
    # 4 base keys each, 2 in common: 2 < 0.5 * 4 is false, so this is the same model with other layers
    own = {"a": _t(1), "b": _t(1), "c": _t(1), "d": _t(1)}
    incoming = {"a": _t(1), "b": _t(1), "x": _t(1), "y": _t(1)}
    assert describe_mismatch(OWNER, incoming, own) == (
        HEAD + "it lacks ['c', 'd'] and has ['x', 'y'] beyond this model: other layer or projector settings "
        "(preset depth, with_projector, modalities) than at training time."
    )
    incoming = {"a": _t(1), "x": _t(1), "y": _t(1), "z": _t(1)}  # 1 < 2: another model
    assert describe_mismatch(OWNER, incoming, own).startswith(HEAD + "it holds another model (e.g. ['x', 'y', 'z'])")


def test_the_smaller_side_decides_whether_it_is_another_model() -> None:
    own = {"a": _t(1), "b": _t(1)}
    incoming = {"a": _t(1), "p": _t(1), "q": _t(1), "r": _t(1), "s": _t(1), "t": _t(1)}
    # 1 key in common, not fewer than half of the smaller side (2): not another model
    assert describe_mismatch(OWNER, incoming, own).startswith(HEAD + "it lacks ['b'] and has ['p', 'q', 'r'] ...")


@pytest.mark.parametrize(
    ("extra", "theirs", "ours"),
    [
        ({"blocks.0.fc" + NF4: _t(1), "blocks.0.fc.weight.absmax": _t(4)}, "nf4", "none"),
        ({"blocks.0.fc.SCB": _t(8)}, "int8", "none"),
        (
            {"blocks.0.fc.lora_A.default.weight": _t(2, 8), "blocks.0.fc.lora_B.default.weight": _t(8, 2)},
            "lora",
            "none",
        ),
    ],
)
def test_another_technique(extra: dict, theirs: str, ours: str) -> None:
    incoming = {**_own(), **extra}
    expected = (
        f"it was saved with technique {theirs!r} and this model is built with {ours!r}. Build it with "
        f"backbone_technique: {theirs} (add +ckpt for activation checkpointing, which a checkpoint does not record)."
    )
    assert describe_mismatch(OWNER, incoming, _own()) == HEAD + expected
    # and the other way round
    swapped = (
        f"it was saved with technique {ours!r} and this model is built with {theirs!r}. Build it with "
        f"backbone_technique: {ours} (add"
    )
    assert describe_mismatch(OWNER, _own(), incoming).startswith(HEAD + swapped)


def test_lora_keys_under_base_layer_compare_with_the_plain_names() -> None:
    own = {k.replace("blocks.0.fc.", "blocks.0.fc.base_layer."): v for k, v in _own().items()}
    own["blocks.0.fc.lora_A.default.weight"] = _t(2, 8)
    incoming = {**own, "blocks.0.fc.base_layer.weight": _t(16, 8)}
    assert describe_mismatch(OWNER, incoming, own) == (
        HEAD + "its blocks.0.fc.weight is [16, 8] and this model's [8, 8]: another preset or model width; use the "
        "backbone_preset the checkpoint was trained with."
    )


def test_other_bands() -> None:
    incoming = {**_own(), "embed.proj.weight": _t(8, 6, 2, 2)}
    assert describe_mismatch(OWNER, incoming, _own()) == (
        HEAD + "its embed.proj.weight takes 6 input bands and this model's 3; set backbone_bands / backbone_in_chans "
        "(or modalities) to what the checkpoint was trained on."
    )


@pytest.mark.parametrize(
    ("shape", "shown"),
    [((16, 3, 2, 2), "[16, 3, 2, 2]"), ((16, 6, 2, 2), "[16, 6, 2, 2]"), ((8, 3, 4, 4), "[8, 3, 4, 4]")],
)
def test_a_patch_kernel_of_another_width_or_size_is_another_preset(shape: tuple, shown: str) -> None:
    incoming = {**_own(), "embed.proj.weight": _t(*shape)}
    assert describe_mismatch(OWNER, incoming, _own()) == (
        HEAD + f"its embed.proj.weight is {shown} and this model's [8, 3, 2, 2]: another preset or model width; use "
        "the backbone_preset the checkpoint was trained with."
    )


def test_a_three_dimensional_tensor_with_other_inner_size_is_another_preset() -> None:
    own = {**_own(), "pos": _t(1, 5, 8)}
    incoming = {**_own(), "pos": _t(1, 9, 8)}
    assert describe_mismatch(OWNER, incoming, own) == (
        HEAD + "its pos is [1, 9, 8] and this model's [1, 5, 8]: another preset or model width; use the "
        "backbone_preset the checkpoint was trained with."
    )


def test_only_the_first_differing_shape_is_reported() -> None:
    incoming = {**_own(), "norm.weight": _t(16), "blocks.1.fc.weight": _t(16, 16), "embed.proj.bias": _t(16)}
    message = describe_mismatch(OWNER, incoming, _own())
    assert message == (
        HEAD + "its blocks.1.fc.weight is [16, 16] and this model's [8, 8]: another preset or model width; use the "
        "backbone_preset the checkpoint was trained with."
    )


def test_missing_and_unexpected_keys_are_listed_three_at_a_time() -> None:
    own = {**_own(), **{f"blocks.{i}.fc.weight": _t(8, 8) for i in range(2, 6)}}
    incoming = {**_own(), "head.weight": _t(2, 8)}
    assert describe_mismatch(OWNER, incoming, own) == (
        HEAD + "it lacks ['blocks.2.fc.weight', 'blocks.3.fc.weight', 'blocks.4.fc.weight'] ... and has "
        "['head.weight'] beyond this model: other layer or projector settings (preset depth, with_projector, "
        "modalities) than at training time."
    )
    three = {**_own(), **{f"blocks.{i}.fc.weight": _t(8, 8) for i in range(2, 5)}}
    assert describe_mismatch(OWNER, _own(), three) == (
        HEAD + "it lacks ['blocks.2.fc.weight', 'blocks.3.fc.weight', 'blocks.4.fc.weight'] and has [] beyond this "
        "model: other layer or projector settings (preset depth, with_projector, modalities) than at training time."
    )
    assert describe_mismatch(OWNER, three, _own()) == (
        HEAD + "it lacks [] and has ['blocks.2.fc.weight', 'blocks.3.fc.weight', 'blocks.4.fc.weight'] beyond this "
        "model: other layer or projector settings (preset depth, with_projector, modalities) than at training time."
    )
    assert describe_mismatch(OWNER, own, _own()).startswith(
        HEAD + "it lacks [] and has ['blocks.2.fc.weight', 'blocks.3.fc.weight', 'blocks.4.fc.weight'] ... beyond"
    )


# -- check_state_matches (the load_state_dict pre-hook) -------------------------------------------------------


class _Described(nn.Linear):
    def describe(self) -> str:
        return "Described(preset='tiny')"


def _call(module: nn.Module, state: dict, prefix: str = "backbone.", strict: bool = True) -> None:
    check_state_matches(module, state, prefix, {}, strict, [], [], [])


def test_the_hook_passes_a_matching_checkpoint_and_ignores_other_prefixes() -> None:
    module = nn.Linear(3, 2)
    assert _call(module, {"backbone.weight": _t(2, 3), "backbone.bias": _t(2), "decoder.weight": _t(9, 9)}) is None
    assert _call(module, {"decoder.weight": _t(9, 9)}) is None  # nothing of this module: left to torch
    assert _call(module, {}) is None


def test_the_hook_raises_with_the_module_name_or_description() -> None:
    with pytest.raises(CheckpointMismatchError) as info:
        _call(nn.Linear(3, 2), {"backbone.weight": _t(4, 3), "backbone.bias": _t(4)})
    assert str(info.value) == (
        "This checkpoint does not match Linear: its bias is [4] and this model's [2]: another preset or model "
        "width; use the backbone_preset the checkpoint was trained with."
    )
    with pytest.raises(CheckpointMismatchError, match=r"^This checkpoint does not match Described\(preset='tiny'\): "):
        _call(_Described(3, 2), {"enc.weight": _t(2, 3), "enc.bias": _t(3)}, prefix="enc.")


def test_the_hook_leaves_non_strict_loads_alone() -> None:
    assert _call(nn.Linear(3, 2), {"backbone.weight": _t(4, 3)}, strict=False) is None


def test_the_hook_runs_inside_load_state_dict() -> None:
    outer = nn.Sequential(nn.Linear(3, 2))
    outer[0].register_load_state_dict_pre_hook(check_state_matches)
    outer.load_state_dict({"0.weight": torch.ones(2, 3), "0.bias": torch.ones(2)})
    assert torch.equal(outer[0].weight, torch.ones(2, 3))
    expected = r"^This checkpoint does not match Linear: its weight is \[5, 3\] and this model's \[2, 3\]: "
    with pytest.raises(CheckpointMismatchError, match=expected):
        outer.load_state_dict({"0.weight": torch.ones(5, 3), "0.bias": torch.ones(2)})
