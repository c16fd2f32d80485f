"""Pure logic of earthmind_compat.arguments: real booleans only, and the accepted dtype spellings.

No ``from __future__ import annotations`` here on purpose: the functions below carry real ``bool``
annotations, and one carries the string ``"bool"`` (what postponed annotations produce).
"""

import pytest
import torch

from earthmind_compat.arguments import boolean_parameters, check_boolean_call, check_booleans, resolve_dtype
from earthmind_compat.errors import ConfigurationError

pytestmark = pytest.mark.reliability

_ADVICE = (
    "Write a YAML boolean (true / false, unquoted) or a Python bool; strings such as 'false' are "
    "refused because Python would read them as True."
)


def _sample(
    self,
    size,
    flag=True,
    typed: bool = None,  # noqa: RUF013  (a bool annotation, as written in the wild)
    quoted: "bool" = 1,
    count=0,
    other: int = False,
    *,
    k=2,
):
    """Booleans: flag (default), typed (annotation), quoted (string annotation), other (default)."""


def test_boolean_parameters_finds_defaults_and_annotations() -> None:
    assert boolean_parameters(_sample) == ["flag", "typed", "quoted", "other"]


def test_boolean_parameters_of_a_function_without_booleans() -> None:
    def plain(a, b=0, c: int = 1, d: str = "x"):
        pass

    assert boolean_parameters(plain) == []


def test_check_booleans_names_the_argument_value_and_type() -> None:
    with pytest.raises(ConfigurationError) as info:
        check_booleans("Backbone", {"size": 3, "flag": True, "typed": "false"}, ["flag", "typed", "missing"])
    assert str(info.value) == f"Backbone argument typed must be true or false, got 'false' (str). {_ADVICE}"


def test_check_booleans_reports_the_first_listed_name() -> None:
    with pytest.raises(ConfigurationError, match=r"^Owner argument b must be true or false, got 1 \(int\)\. "):
        check_booleans("Owner", {"a": False, "b": 1, "c": "no"}, ["a", "b", "c"])


@pytest.mark.parametrize("values", [{}, {"flag": True, "typed": False}, {"flag": False, "size": "not checked"}])
def test_check_booleans_accepts_real_booleans_and_absent_names(values: dict) -> None:
    assert check_booleans("Backbone", values, ["flag", "typed"]) is None


def test_check_boolean_call_checks_positional_and_keyword_arguments() -> None:
    with pytest.raises(ConfigurationError, match=r"^Sample argument flag must be true or false, got 'yes' \(str\)"):
        check_boolean_call(_sample, "Sample", (object(), 4, "yes"), {})
    with pytest.raises(ConfigurationError, match=r"^Sample argument other must be true or false, got None"):
        check_boolean_call(_sample, "Sample", (object(), 4), {"other": None})


def test_check_boolean_call_accepts_a_good_call_and_leaves_a_bad_call_to_python() -> None:
    assert check_boolean_call(_sample, "Sample", (object(), 4, False), {"typed": True, "k": "x"}) is None
    # too many positional arguments: binding fails, and the call itself will raise TypeError
    assert check_boolean_call(_sample, "Sample", (object(), 1, 2, 3, 4, 5, 6, 7, 8), {}) is None
    assert check_boolean_call(_sample, "Sample", (), {"nope": "false"}) is None


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (None, torch.float32),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("torch.float16", torch.float16),
        ("Torch.BFloat16", torch.bfloat16),
    ],
)
def test_resolve_dtype(dtype: object, expected: torch.dtype) -> None:
    assert resolve_dtype(dtype) is expected


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, "float64", "half", "torch.", "", 16, True])
def test_resolve_dtype_refuses_other_dtypes(dtype: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_dtype(dtype)
    assert str(info.value) == (
        f"dtype={dtype!r} is not a supported compute dtype; use one of float32, fp32, bfloat16, bf16, float16, "
        "fp16 (or leave it unset for float32)."
    )
