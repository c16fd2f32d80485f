"""The ``earthmind-compat`` command line: check table, JSON, name suggestions."""

from __future__ import annotations

import json

import pytest

from earthmind_compat.backbones import BACKBONE_BUILDERS
from earthmind_compat.check import FEATURES, Row, format_table
from earthmind_compat.cli import main

pytestmark = pytest.mark.registry


def test_check_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "out" / "check.json"
    assert main(["check", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    document = json.loads(path.read_text())
    pairs = {(r["backbone"], r["feature"]) for r in document["rows"]}
    assert pairs == {(b, f) for b in BACKBONE_BUILDERS for f in FEATURES}
    assert document["failed"] == 0 and document["passed"] == len(pairs)
    assert {"python", "torch", "terratorch", "transformers"} <= set(document["versions"])
    for backbone in BACKBONE_BUILDERS:
        assert backbone in printed
    assert f"{len(pairs)} passed, 0 failed" in printed


def test_check_reports_a_failing_feature(monkeypatch, capsys):
    def broken(backbone: str) -> str:
        raise RuntimeError("deliberately broken")

    monkeypatch.setitem(FEATURES, "broken", broken)
    assert main(["check", "--backbones", "internvl2_5_4b", "--features", "broken"]) == 1
    assert "RuntimeError: deliberately broken" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["check", "--backbones", "granite4_tiny"], "granite_4_tiny"),
        (["check", "--features", "segmentaton"], "segmentation"),
    ],
)
def test_unknown_names_suggest_the_closest(argv, suggestion, capsys):
    assert main(argv) == 2
    assert f"Did you mean '{suggestion}'" in capsys.readouterr().err


def test_table_lists_every_row():
    rows = [Row("a", "forward", "pass", "ok", 0.1), Row("b", "segmentation", "fail", "Boom", 1.0)]
    table = format_table(rows).splitlines()
    assert len(table) == 4 and "FAIL" in table[3] and "Boom" in table[3]
