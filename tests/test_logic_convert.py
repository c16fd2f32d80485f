"""Pure logic of EarthMind's key map (convert.py): remote-code names to native names, strictly.

The expected native names are written out one by one from the transformers InternVL / our gate layout, not
derived from the rules. ``convert_checkpoint`` runs on an in-memory checkpoint with fixed native shapes (the
real meta-device shapes and files are tests/test_earthmind_conversion.py and tests/test_loader.py).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from earthmind_compat.errors import WeightsError


def _convert_module():
    """The key map's module (it moved from earthmind_compat.convert to earthmind_compat.backbones.convert)."""
    for name in ("earthmind_compat.backbones.convert", "earthmind_compat.convert"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError("earthmind_compat convert module")


convert = _convert_module()

pytestmark = pytest.mark.reliability

QKV = "vision_model.encoder.layers.3.attn.qkv.weight"


@pytest.mark.parametrize(
    ("remote", "native"),
    [
        ("vision_model.embeddings.class_embedding", "vision_tower.embeddings.cls_token"),
        (
            "vision_model.embeddings.patch_embedding.weight",
            "vision_tower.embeddings.patch_embeddings.projection.weight",
        ),
        ("vision_model.embeddings.patch_embedding.bias", "vision_tower.embeddings.patch_embeddings.projection.bias"),
        ("vision_model.embeddings.position_embedding", "vision_tower.embeddings.position_embeddings"),
        (
            "vision_model.encoder.layers.12.attn.proj.bias",
            "vision_tower.encoder.layer.12.attention.projection_layer.bias",
        ),
        ("vision_model.encoder.layers.0.attn.q_norm.weight", "vision_tower.encoder.layer.0.attention.q_norm.weight"),
        ("vision_model.encoder.layers.1.attn.k_norm.weight", "vision_tower.encoder.layer.1.attention.k_norm.weight"),
        ("vision_model.encoder.layers.0.mlp.fc2.weight", "vision_tower.encoder.layer.0.mlp.fc2.weight"),
        ("vision_model.encoder.layers.7.mlp.fc1.bias", "vision_tower.encoder.layer.7.mlp.fc1.bias"),
        ("vision_model.encoder.layers.2.norm1.bias", "vision_tower.encoder.layer.2.layernorm_before.bias"),
        ("vision_model.encoder.layers.2.norm2.weight", "vision_tower.encoder.layer.2.layernorm_after.weight"),
        ("vision_model.encoder.layers.23.ls1", "vision_tower.encoder.layer.23.lambda_1"),
        ("vision_model.encoder.layers.23.ls2", "vision_tower.encoder.layer.23.lambda_2"),
        ("mlp1.0.weight", "projector.layer_norm.weight"),
        ("mlp1.1.bias", "projector.linear_1.bias"),
        ("mlp1.3.weight", "projector.linear_2.weight"),
        ("local_query", "gate.local_query"),
    ],
)
def test_each_remote_name_has_one_native_name(remote: str, native: str) -> None:
    plan = convert.plan_keys([remote])
    assert plan.sources == {native: (remote, 0, 1)}
    assert (plan.skipped, plan.unmatched) == ({}, [])


def test_the_fused_qkv_splits_into_three_in_order() -> None:
    plan = convert.plan_keys([QKV, QKV.replace("weight", "bias")])
    layer = "vision_tower.encoder.layer.3.attention."
    assert plan.sources == {
        layer + "q_proj.weight": (QKV, 0, 3),
        layer + "k_proj.weight": (QKV, 1, 3),
        layer + "v_proj.weight": (QKV, 2, 3),
        layer + "q_proj.bias": (QKV.replace("weight", "bias"), 0, 3),
        layer + "k_proj.bias": (QKV.replace("weight", "bias"), 1, 3),
        layer + "v_proj.bias": (QKV.replace("weight", "bias"), 2, 3),
    }


def test_parts_that_are_not_the_backbone_are_skipped_with_a_reason() -> None:
    keys = ["language_model.model.layers.0.mlp.up_proj.weight", "grounding_encoder.sam2.x", "text_hidden_fcs.0.weight"]
    plan = convert.plan_keys(keys)
    assert plan.sources == {}
    assert plan.unmatched == []
    assert plan.skipped == {
        keys[0]: "the Qwen2.5 language model reads the image tokens; not an image backbone",
        keys[1]: "the SAM2 grounding encoder decodes masks from [SEG] tokens",
        keys[2]: "maps the language model's [SEG] states to SAM2 prompts",
    }


def test_names_must_match_a_rule_whole_and_unmatched_names_are_sorted() -> None:
    keys = [
        "mlp1.2.weight",  # the GELU between the projector's linears has no weights
        "xvision_model.embeddings.class_embedding",
        "vision_model.embeddings.class_embedding.extra",
        "vision_model.encoder.layers.x.ls1",
        "local_query2",
        "language_model",
    ]
    plan = convert.plan_keys(keys)
    assert plan.sources == {}
    assert plan.skipped == {}
    assert plan.unmatched == sorted(keys)


def test_a_key_matching_two_rules_is_an_error_of_the_map() -> None:
    rules = (convert.KeyRule(r"a.*", ("x",)), convert.KeyRule(r"ab", ("y",)), convert.KeyRule(r"c", ("z",)))
    assert convert.plan_keys(["c", "ac"], rules).sources == {"z": ("c", 0, 1), "x": ("ac", 0, 1)}
    with pytest.raises(WeightsError) as info:
        convert.plan_keys(["c", "ab"], rules)
    assert str(info.value) == "Key map is ambiguous: 'ab' matches ['a.*', 'ab']."


def test_is_remote_config() -> None:
    assert convert.is_remote_config({"model_type": "sa2va_chat"}) is True
    assert convert.is_remote_config({"model_type": "internvl_chat"}) is True
    assert convert.is_remote_config({"model_type": "internvl"}) is False
    assert convert.is_remote_config({}) is False


def test_split_layout_groups_by_part() -> None:
    a, b, c = torch.zeros(1), torch.ones(2), torch.zeros(3)
    parts = convert.split_layout({"vision_tower.encoder.layer.0.x": a, "projector.linear_1.weight": b, "gate.q": c})
    assert parts == {"vision_tower": {"encoder.layer.0.x": a}, "projector": {"linear_1.weight": b}, "gate": {"q": c}}
    assert parts["projector"]["linear_1.weight"] is b
    assert convert.split_layout({}) == {"vision_tower": {}, "projector": {}, "gate": {}}


# -- convert_checkpoint on an in-memory checkpoint -----------------------------------------------------------

LAYER = "vision_tower.encoder.layer.0.attention."
SHAPES = {
    LAYER + "q_proj.weight": torch.Size([2, 2]),
    LAYER + "k_proj.weight": torch.Size([2, 2]),
    LAYER + "v_proj.weight": torch.Size([2, 2]),
    "projector.linear_1.bias": torch.Size([3]),
}
QKV0 = "vision_model.encoder.layers.0.attn.qkv.weight"


def _checkpoint(tensors: dict[str, torch.Tensor], extra_keys: tuple[str, ...] = ()) -> SimpleNamespace:
    loaded: list[set[str]] = []

    def load(keys: object) -> dict[str, torch.Tensor]:
        wanted = set(keys)
        loaded.append(wanted)
        return {k: v for k, v in tensors.items() if k in wanted}

    def shapes(keys: object) -> dict[str, tuple[int, ...]]:
        return {k: tuple(tensors[k].shape) for k in keys}

    return SimpleNamespace(
        directory=Path("/ckpt"),
        config={"model_type": "sa2va_chat"},
        keys=[*tensors, *extra_keys],
        load=load,
        shapes=shapes,
        loaded=loaded,
    )


@pytest.fixture
def shapes() -> dict[str, torch.Size]:
    return dict(SHAPES)


def test_convert_renames_and_splits(shapes: dict) -> None:
    qkv = torch.arange(12.0).reshape(6, 2)
    bias = torch.tensor([1.0, 2.0, 3.0])
    checkpoint = _checkpoint({QKV0: qkv, "mlp1.1.bias": bias}, extra_keys=("language_model.lm_head.weight",))
    out = convert.convert_checkpoint(checkpoint, shapes)
    assert sorted(out) == sorted(SHAPES)
    assert torch.equal(out[LAYER + "q_proj.weight"], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    assert torch.equal(out[LAYER + "k_proj.weight"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert torch.equal(out[LAYER + "v_proj.weight"], torch.tensor([[8.0, 9.0], [10.0, 11.0]]))
    assert out["projector.linear_1.bias"] is bias
    assert checkpoint.loaded == [{QKV0, "mlp1.1.bias"}]  # the language model is never read


def _message(checkpoint: SimpleNamespace, expected: dict = SHAPES) -> str:
    with pytest.raises(WeightsError) as info:
        convert.convert_checkpoint(checkpoint, expected)
    return str(info.value)


CLEANLY = "The sa2va_chat checkpoint in /ckpt does not convert cleanly: "
WRONG = "The sa2va_chat checkpoint in /ckpt has tensors of another shape than the model built from its config.json: "
FIX = (
    ". config.json does not describe these tensors (a dimension it leaves out takes the released code's default); "
    "fix config.json or pass the directory it was saved with."
)
ADVICE = ". Is it a complete sa2va_chat checkpoint whose config matches its tensors?"


def test_missing_native_tensors_are_listed(shapes: dict) -> None:
    shapes["gate.local_query"] = torch.Size([4])
    checkpoint = _checkpoint({QKV0: torch.zeros(6, 2), "mlp1.1.bias": torch.zeros(3)})
    assert _message(checkpoint, shapes) == CLEANLY + "missing ['gate.local_query']" + ADVICE
    assert checkpoint.loaded == []  # refused before any tensor is read


def test_unmatched_and_surplus_remote_tensors_are_listed(shapes: dict) -> None:
    tensors = {
        QKV0: torch.zeros(6, 2),
        "mlp1.1.bias": torch.zeros(3),
        "vision_model.encoder.layers.5.ls1": torch.zeros(2),
    }
    assert _message(_checkpoint(tensors, extra_keys=("foo",)), shapes) == (
        CLEANLY + "unexpected ['foo', 'vision_model.encoder.layers.5.ls1']" + ADVICE
    )


def test_missing_and_unexpected_together(shapes: dict) -> None:
    shapes["gate.local_query"] = torch.Size([4])
    checkpoint = _checkpoint({QKV0: torch.zeros(6, 2), "mlp1.1.bias": torch.zeros(3)}, extra_keys=("mlp1.2.weight",))
    assert (
        _message(checkpoint, shapes) == CLEANLY + "missing ['gate.local_query']; unexpected ['mlp1.2.weight']" + ADVICE
    )


def test_long_listings_are_cut_at_twelve(shapes: dict) -> None:
    extra = tuple(f"extra.{i:02d}" for i in range(13))
    message = _message(_checkpoint({QKV0: torch.zeros(6, 2), "mlp1.1.bias": torch.zeros(3)}, extra_keys=extra))
    assert message == CLEANLY + f"unexpected {list(extra[:12])} ... (13 in all)" + ADVICE
    twelve = extra[:12]
    message = _message(_checkpoint({QKV0: torch.zeros(6, 2), "mlp1.1.bias": torch.zeros(3)}, extra_keys=twelve))
    assert message == CLEANLY + f"unexpected {list(twelve)}" + ADVICE


def test_wrong_shapes_are_listed_sorted_before_any_tensor_is_read(shapes: dict) -> None:
    checkpoint = _checkpoint({QKV0: torch.zeros(5, 2), "mlp1.1.bias": torch.zeros(4)})
    assert _message(checkpoint, shapes) == (
        WRONG
        + "['mlp1.1.bias -> projector.linear_1.bias: (4,) vs (3,)'"
        + f", '{QKV0}: (5, 2) does not split into 3'" * 3  # once per chunk it should have given
        + "]"
        + FIX
    )
    assert checkpoint.loaded == []  # the headers told: nothing was read
    checkpoint = _checkpoint({QKV0: torch.zeros(6, 3), "mlp1.1.bias": torch.zeros(3)})
    message = _message(checkpoint, shapes)
    assert message.startswith(WRONG + f"['{QKV0} -> {LAYER}")
    assert message.count("(2, 3) vs (2, 2)") == 3


def test_more_than_five_wrong_shapes_are_cut() -> None:
    expected = {f"vision_tower.encoder.layer.{i}.lambda_1": torch.Size([2]) for i in range(6)}
    tensors = {f"vision_model.encoder.layers.{i}.ls1": torch.zeros(3) for i in range(6)}
    message = _message(_checkpoint(tensors), expected)
    wrong = sorted(
        f"vision_model.encoder.layers.{i}.ls1 -> vision_tower.encoder.layer.{i}.lambda_1: (3,) vs (2,)"
        for i in range(6)
    )
    assert message == WRONG + f"{wrong[:5]} ... (6 in all)" + FIX


def test_a_rule_with_two_targets_splits_in_halves() -> None:
    expected = {"x": torch.Size([2, 2]), "y": torch.Size([2, 2])}
    rules = (convert.KeyRule(r"kv", ("x", "y")),)
    out = convert.convert_checkpoint(_checkpoint({"kv": torch.arange(8.0).reshape(4, 2)}), expected, rules=rules)
    assert torch.equal(out["x"], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    assert torch.equal(out["y"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))


def test_only_the_parts_asked_for_are_read(shapes: dict) -> None:
    checkpoint = _checkpoint({QKV0: torch.zeros(6, 2), "mlp1.1.bias": torch.zeros(3)})
    out = convert.convert_checkpoint(checkpoint, shapes, parts={"vision_tower"})
    assert sorted(out) == sorted(k for k in SHAPES if k.startswith("vision_tower."))
    assert checkpoint.loaded == [{QKV0}]  # the projector's tensor was planned and checked, never read
