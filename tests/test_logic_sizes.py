"""Pure logic of earthmind_compat.sizes: memory sizes as people write them and as the planner prints them.

Expected values are written out by hand (powers of 1000 and 1024), not recomputed with the module.
"""

from __future__ import annotations

import pytest

from earthmind_compat.errors import ConfigurationError
from earthmind_compat.sizes import format_bytes, parse_size

pytestmark = pytest.mark.reliability


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * 1024**3),
        ("80GB", 80 * 1000**3),
        ("512MiB", 512 * 1024**2),
        ("1.5KiB", 1536),
        ("3k", 3000),
        ("3KB", 3000),
        ("2M", 2_000_000),
        ("1T", 1_000_000_000_000),
        ("1TiB", 1_099_511_627_776),
        ("100", 100),
        ("100B", 100),
        ("100b", 100),
        ("  2 gib ", 2_147_483_648),
        ("0.5MB", 500_000),
        ("7G", 7_000_000_000),
        ("1gi", 1_073_741_824),
    ],
)
def test_parse_size_reads_decimal_and_binary_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected
    assert type(parse_size(text)) is int


def test_parse_size_passes_none_and_byte_counts_through() -> None:
    assert parse_size(None) is None
    assert parse_size(12345) == 12345
    assert parse_size(0) == 0


@pytest.mark.parametrize("text", ["abc", "", "GiB", "24XB", "24 GiBs", "-1GB", "1e9"])
def test_parse_size_refuses_unreadable_sizes(text: str) -> None:
    with pytest.raises(ConfigurationError, match=r"Cannot read the memory size .*24GiB, 80GB or 512MiB") as info:
        parse_size(text)
    assert repr(text) in str(info.value)


def test_parse_size_refuses_a_malformed_number() -> None:
    with pytest.raises(ConfigurationError):
        parse_size("1.2.3")


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (1_048_575, "1024.00 KiB"),
        (1_048_576, "1.00 MiB"),
        (3 * 1_048_576 // 2, "1.50 MiB"),
        (5 * 1_073_741_824, "5.00 GiB"),
        (1_099_511_627_776, "1.00 TiB"),
        (1024 * 1_099_511_627_776, "1024.00 TiB"),
        (-5, "-5 B"),
        (-2048, "-2.00 KiB"),
    ],
)
def test_format_bytes(count: int, expected: str) -> None:
    assert format_bytes(count) == expected
