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


@pytest.mark.benchmark
def test_benchmark_writes_table_json_and_png(tmp_path, capsys):
    argv = ["benchmark", "--backbones", "internvl2_5_4b", "--techniques", "none", "nf4", "--rounds", "1"]
    assert main([*argv, "--device", "cpu", "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    document = json.loads((tmp_path / "benchmark.json").read_text())
    cells = {(r["backbone"], r["technique"], r["mode"]) for r in document["results"]}
    assert cells == {("internvl2_5_4b", t, m) for t in ("none", "nf4") for m in ("forward", "train")}
    weights = {r["technique"]: r["weight_bytes"] for r in document["results"]}
    assert 0 < weights["nf4"] < weights["none"]
    assert (tmp_path / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert printed.count("internvl2_5_4b") == 4  # one table row per cell


@pytest.mark.benchmark
def test_optimize_reports_fidelity_per_technique(tmp_path, capsys):
    argv = ["optimize", "--backbone", "granite_4_tiny", "--test", "none", "int8", "--rounds", "1"]
    assert main([*argv, "--device", "cpu", "--output", str(tmp_path)]) == 0
    fidelity = json.loads((tmp_path / "optimize.json").read_text())["fidelity"]
    assert fidelity["none"] == pytest.approx({"worst_block_cosine": 1.0, "mean_block_rel_error": 0.0}, abs=1e-9)
    assert 0.99 < fidelity["int8"]["worst_block_cosine"] < 1.0 and fidelity["int8"]["mean_block_rel_error"] > 0
    assert (tmp_path / "optimize.png").is_file()
    table = capsys.readouterr().out.split("technique  worst block cosine")[1].splitlines()
    assert [line.split()[0] for line in table[2:4]] == ["none", "int8"]


@pytest.mark.parametrize("command", [["benchmark", "--backbones"], ["optimize", "--backbone"]])
def test_benchmark_commands_suggest_the_closest_backbone(command, capsys):
    assert main([*command, "internvl25_4b"]) == 2
    assert "Did you mean 'internvl2_5_4b'" in capsys.readouterr().err
