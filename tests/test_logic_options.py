"""Pure logic of earthmind_compat.optimize.options: backbone constructor options to a technique and kwargs.

``apply`` itself (bitsandbytes, peft) is replaced by a recorder here: these tests check which technique and
keyword arguments the options turn into, and when they are applied, not what applying does (that is
tests/test_optimize.py).
"""

from __future__ import annotations

import importlib

import pytest
from torch import nn

import earthmind_compat.optimize.options as options_module
from earthmind_compat.errors import ConfigurationError, UnknownNameError
from earthmind_compat.optimize.options import apply_options, resolve_options

pytestmark = pytest.mark.reliability

# The package re-exports the function apply as earthmind_compat.optimize.apply, hiding the submodule's name.
apply_module = importlib.import_module("earthmind_compat.optimize.apply")


# -- resolve_options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "technique", "kwargs"),
    [
        ({}, "none", {}),
        ({"technique": "qlora+ckpt"}, "nf4+dq+lora+ckpt", {}),
        ({"technique": "none"}, "none", {}),
        ({"technique": "nf4", "lora": False, "quantization": None, "activation_checkpointing": False}, "nf4", {}),
        ({"technique": None, "lora": True}, "lora", {}),
        ({"quantization": "nf4+dq"}, "nf4+dq", {}),
        ({"quantization": "int8", "lora": True}, "int8+lora", {}),
        ({"quantization": {"type": "int8"}}, "int8", {"quantize_moe_experts": True}),
        ({"quantization": {"type": "nf4", "double_quant": False}}, "nf4", {"quantize_moe_experts": True}),
        (
            {"quantization": {"type": "fp4", "double_quant": True, "experts": False}},
            "fp4+dq",
            {"quantize_moe_experts": False},
        ),
        (
            {"lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj"]}},
            "lora",
            {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "lora_target_modules": ["q_proj"]},
        ),
        ({"lora": {}}, "lora", {}),
        ({"lora": {"alpha": 32}}, "lora", {"lora_alpha": 32}),
        ({"lora": False, "activation_checkpointing": True}, "ckpt", {}),
        ({"activation_checkpointing": False}, "none", {}),
        ({"activation_checkpointing": {}}, "ckpt", {}),
        ({"activation_checkpointing": {"every": 1}}, "ckpt", {"checkpoint_every": 1}),
        ({"lora": True, "activation_checkpointing": {"every": 3}}, "lora+ckpt", {"checkpoint_every": 3}),
        (
            {"quantization": {"type": "nf4", "double_quant": True}, "lora": {"r": 2}, "activation_checkpointing": True},
            "nf4+dq+lora+ckpt",
            {"quantize_moe_experts": True, "lora_r": 2},
        ),
    ],
)
def test_resolve_options(options: dict, technique: str, kwargs: dict) -> None:
    assert resolve_options(options) == (technique, kwargs)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"technique": "nf4", "lora": True},
            "Give either technique='nf4' or ['lora'], not both (technique is the shorthand for them).",
        ),
        (
            {"technique": "ckpt", "quantization": "nf4", "activation_checkpointing": True},
            "Give either technique='ckpt' or ['quantization', 'activation_checkpointing'], not both (technique is the "
            "shorthand for them).",
        ),
        ({"quantization": {"double_quant": True}}, "backbone quantization mapping needs a 'type' (int8, nf4 or fp4)."),
        ({"quantization": 4}, "backbone quantization must be a name such as 'nf4' or a mapping, got 4."),
        ({"quantization": True}, "backbone quantization must be a name such as 'nf4' or a mapping, got True."),
        ({"lora": "yes"}, "backbone lora must be true/false or a mapping of LoRA settings, got 'yes'."),
        ({"lora": 2}, "backbone lora must be true/false or a mapping of LoRA settings, got 2."),
        (
            {"activation_checkpointing": "true"},
            "backbone activation_checkpointing must be true, false or a mapping such as {every: 2}, got 'true'.",
        ),
        (
            {"activation_checkpointing": 2},
            "backbone activation_checkpointing must be true, false or a mapping such as {every: 2}, got 2.",
        ),
    ],
)
def test_resolve_options_refuses_malformed_options(options: dict, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_options(options)
    assert str(info.value) == message


@pytest.mark.parametrize("every", [0, -2, True, 2.0, "2", None])
def test_checkpointing_granularity_must_be_an_integer_from_1(every: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_options({"activation_checkpointing": {"every": every}})
    assert str(info.value) == (
        "activation checkpointing 'every' must be an integer >= 1 (1 checkpoints every block, 2 every second block, "
        f"...), got {every!r} ({type(every).__name__})."
    )


def test_unknown_checkpointing_key_is_named() -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_options({"activation_checkpointing": {"evry": 2}})
    assert str(info.value).startswith("Unknown key 'evry' in backbone activation_checkpointing. Did you mean 'every'?")
    assert str(info.value).endswith(" Valid keys: every.")


@pytest.mark.parametrize(
    ("options", "start"),
    [
        ({"quantization": {"type": "nf4", "bits": 4}}, "Unknown key 'bits' in backbone quantization."),
        ({"quantization": {"type": "nf4", "doublequant": True}}, "Unknown key 'doublequant' in backbone quantization."),
        ({"lora": {"rank": 4}}, "Unknown key 'rank' in backbone lora."),
    ],
)
def test_unknown_keys_are_named_with_the_valid_ones(options: dict, start: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_options(options)
    message = str(info.value)
    assert message.startswith(start)
    valid = "type, double_quant, experts" if "quantization" in options else "r, alpha, dropout, target_modules"
    assert message.endswith(f" Valid keys: {valid}.")
    if "doublequant" in start:
        assert "'double_quant'" in message.removesuffix(f" Valid keys: {valid}.")


@pytest.mark.parametrize(("key", "value"), [("double_quant", "true"), ("experts", "no"), ("experts", 1)])
def test_quantization_mapping_takes_real_booleans(key: str, value: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_options({"quantization": {"type": "nf4", key: value}})
    assert str(info.value).startswith(
        f"backbone quantization argument {key} must be true or false, got {value!r} ({type(value).__name__})."
    )


def test_quantization_type_goes_through_the_technique_parser() -> None:
    with pytest.raises(UnknownNameError, match=r"^Unknown technique 'nf5'"):
        resolve_options({"quantization": {"type": "nf5"}})
    with pytest.raises(ConfigurationError, match="'dq' quantizes the scales of 4-bit weights"):
        resolve_options({"quantization": {"type": "int8", "double_quant": True}})


# -- apply_options --------------------------------------------------------------------------------------------


@pytest.fixture
def applied(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Record calls of optimize.apply.apply instead of quantizing anything."""
    calls: list[tuple] = []

    def record(backbone: nn.Module, technique: str, **kwargs: object) -> None:
        calls.append((backbone, technique, kwargs))

    monkeypatch.setattr(apply_module, "apply", record)
    # options either imports apply at module level or at call time: replace it in both places
    monkeypatch.setattr(options_module, "apply", record, raising=False)
    return calls


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, None),
        ({"activation_checkpointing": False, "lora": False}, None),
        ({"technique": "none"}, None),
        ({"lora": True}, ("lora", {})),
        ({"technique": "qlora"}, ("nf4+dq+lora", {})),
        ({"quantization": {"type": "int8"}}, ("int8", {"quantize_moe_experts": True})),
        ({"lora": {"r": 2}}, ("lora", {"lora_r": 2})),
    ],
)
def test_apply_options_applies_only_what_was_asked(applied: list, options: dict, expected: tuple | None) -> None:
    backbone = nn.Linear(2, 2)
    assert apply_options(backbone, options) is None
    if expected is None:
        assert applied == []
    else:
        assert len(applied) == 1
        assert applied[0][0] is backbone
        assert applied[0][1:] == expected
