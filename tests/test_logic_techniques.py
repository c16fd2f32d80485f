"""Pure logic of earthmind_compat.optimize.techniques: technique strings to :class:`Techniques` values.

Every expectation is the full dataclass written out field by field (quantization, double_quant, lora,
kbit_prep, checkpointing), so a flag set or lost by mistake shows.
"""

from __future__ import annotations

import pytest

from earthmind_compat.errors import ConfigurationError, UnknownNameError
from earthmind_compat.optimize.techniques import Techniques, parse_technique

pytestmark = pytest.mark.reliability


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("none", (None, False, False, False, False)),
        ("", (None, False, False, False, False)),
        (" + ", (None, False, False, False, False)),
        ("int8", ("int8", False, False, False, False)),
        ("nf4", ("nf4", False, False, False, False)),
        ("fp4", ("fp4", False, False, False, False)),
        ("nf4+dq", ("nf4", True, False, False, False)),
        ("dq+fp4", ("fp4", True, False, False, False)),
        ("lora", (None, False, True, False, False)),
        ("ckpt", (None, False, False, False, True)),
        ("none+ckpt", (None, False, False, False, True)),
        ("lora+ckpt", (None, False, True, False, True)),
        ("int8+lora", ("int8", False, True, True, False)),
        ("fp4+lora", ("fp4", False, True, True, False)),
        ("nf4+dq+lora+ckpt", ("nf4", True, True, True, True)),
        ("qlora", ("nf4", True, True, True, False)),
        ("qlora+ckpt", ("nf4", True, True, True, True)),
        ("nf4+qlora", ("nf4", True, True, True, False)),
        ("qlora+nf4+dq", ("nf4", True, True, True, False)),
        ("int8+int8", ("int8", False, False, False, False)),
        ("  NF4 + LoRA + CKPT ", ("nf4", False, True, True, True)),
        ("Int8++ckpt", ("int8", False, False, False, True)),
    ],
)
def test_parse_technique(text: str, fields: tuple) -> None:
    assert parse_technique(text) == Techniques(*fields)


def test_parse_technique_passes_parsed_values_through_and_reads_none_as_nothing() -> None:
    parsed = Techniques("nf4", True, True, True, True)
    assert parse_technique(parsed) is parsed
    assert parse_technique(None) == Techniques(None, False, False, False, False)


@pytest.mark.parametrize("value", [4, ["nf4"], b"nf4", True])
def test_parse_technique_refuses_non_strings(value: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_technique(value)
    assert str(info.value) == f"technique must be a string such as 'nf4+lora+ckpt', got {value!r}."


@pytest.mark.parametrize(
    ("text", "first", "second"),
    [("int8+nf4", "int8", "nf4"), ("nf4+fp4", "nf4", "fp4"), ("qlora+fp4", "nf4", "fp4"), ("fp4+qlora", "fp4", "nf4")],
)
def test_two_quantizations_are_refused(text: str, first: str, second: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_technique(text)
    assert str(info.value) == f"{text!r} asks for two quantizations ({first} and {second}); keep one."


@pytest.mark.parametrize("text", ["dq", "int8+dq", "dq+lora", "dq+ckpt"])
def test_double_quantization_needs_four_bits(text: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_technique(text)
    assert str(info.value) == (
        f"{text!r}: 'dq' quantizes the scales of 4-bit weights; combine it with nf4 or fp4 (e.g. 'nf4+dq')."
    )


@pytest.mark.parametrize(("text", "bad"), [("nf5", "nf5"), ("nf4+Lorra", "lorra"), ("ckpt+ int4", "int4")])
def test_unknown_technique_names_the_part_and_the_valid_ones(text: str, bad: str) -> None:
    with pytest.raises(UnknownNameError) as info:
        parse_technique(text)
    message = str(info.value)
    assert message.startswith(f"Unknown technique {bad!r}.")
    listed = message.partition(" Valid techniques: ")[2]
    assert listed.endswith(".")
    assert sorted(listed[:-1].split(", ")) == ["ckpt", "dq", "fp4", "int8", "lora", "nf4", "none", "qlora"]


@pytest.mark.parametrize(
    ("fields", "name", "trains_base", "bits"),
    [
        ((None, False, False, False, False), "none", True, 32),
        (("int8", False, False, False, False), "int8", False, 8),
        (("nf4", True, True, True, True), "nf4+dq+lora+ckpt", False, 4),
        (("fp4", False, False, False, True), "fp4+ckpt", False, 4),
        ((None, False, True, False, False), "lora", False, 32),
    ],
)
def test_derived_properties(fields: tuple, name: str, trains_base: bool, bits: int) -> None:
    techniques = Techniques(*fields)
    assert (techniques.name, techniques.trains_base, techniques.bits) == (name, trains_base, bits)
    assert parse_technique(name) == techniques
