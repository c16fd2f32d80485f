"""The ``earthmind-compat`` command line: check table, JSON, name suggestions, start-up without TerraTorch."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys

import pytest

from earthmind_compat.builders import BACKBONE_BUILDERS
from earthmind_compat.check import FEATURES, Row, format_table
from earthmind_compat.cli import COMMAND_MODULES, main


@pytest.mark.registry
def test_check_writes_table_and_json(tmp_path, capsys, monkeypatch):
    """The table and the JSON say the same, row by row, pass or fail.

    Whether each backbone x feature passes is the matrix's ``check`` column (``earthmind-compat check`` in
    every cell and in .ci/run); here one passing and one failing feature show that both are reported.
    """

    def broken(backbone: str) -> str:
        raise RuntimeError(f"deliberately broken for {backbone}")

    monkeypatch.setitem(FEATURES, "broken", broken)
    path = tmp_path / "out" / "check.json"
    assert main(["check", "--features", "forward", "broken", "--json", str(path)]) == 1
    printed = capsys.readouterr().out
    document = json.loads(path.read_text())
    rows = {(r["backbone"], r["feature"]): r["status"] for r in document["rows"]}
    assert set(rows) == {(b, f) for b in BACKBONE_BUILDERS for f in ("forward", "broken")}
    assert {s for (_, f), s in rows.items() if f == "broken"} == {"fail"}
    passed = sum(s == "pass" for s in rows.values())
    assert (document["passed"], document["failed"]) == (passed, len(rows) - passed)
    assert {"python", "torch", "terratorch", "transformers"} <= set(document["versions"])
    for (backbone, feature), status in rows.items():
        line = next(line for line in printed.splitlines() if backbone in line and feature in line)
        assert status.upper() in line.upper()
    assert f"{passed} passed, {len(rows) - passed} failed" in printed


@pytest.mark.registry
def test_check_reports_a_failing_feature(monkeypatch, capsys):
    def broken(backbone: str) -> str:
        raise RuntimeError("deliberately broken")

    monkeypatch.setitem(FEATURES, "broken", broken)
    assert main(["check", "--backbones", "internvl2_5_4b", "--features", "broken"]) == 1
    assert "RuntimeError: deliberately broken" in capsys.readouterr().out


@pytest.mark.registry
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


@pytest.mark.registry
def test_table_lists_every_row():
    rows = [Row("a", "forward", "pass", "ok", 0.1), Row("b", "segmentation", "fail", "Boom", 1.0)]
    table = format_table(rows).splitlines()
    assert len(table) == 4 and "FAIL" in table[3] and "Boom" in table[3]


@pytest.mark.registry
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


@pytest.mark.registry
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


@pytest.mark.registry
@pytest.mark.parametrize("command", [["benchmark", "--backbones"], ["optimize", "--backbone"]])
def test_benchmark_commands_suggest_the_closest_backbone(command, capsys):
    assert main([*command, "internvl25_4b"]) == 2
    assert "Did you mean 'internvl2_5_4b'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ start-up

#: Imported only inside the command that runs: ``--help`` and argument errors must not pay for them.
HEAVY_MODULES = ("torch", "terratorch", "transformers", "bitsandbytes", "peft", "matplotlib", "lightning")
#: Runs the installed console script's entry point (as pip wrote it) under ``-X importtime``.
ENTRY_POINT = (
    "import sys\n"
    "from importlib.metadata import entry_points\n"
    "(script,) = entry_points(group='console_scripts', name='earthmind-compat')\n"
    "sys.argv[0] = 'earthmind-compat'\n"
    "sys.exit(script.load()())\n"
)


def _run_console_script(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``earthmind-compat *args`` in a fresh interpreter; return the process and every module it imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", ENTRY_POINT, *args],
        capture_output=True,
        text=True,
        # a guard against a hang, not a speed check: importing TerraTorch and tracing a tiny plan took over
        # 120 s in a matrix cell run beside other jobs on the 2-core machine (tf4.52.1 cell, 2026-12-03)
        timeout=600,
        check=False,
    )
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", proc.stderr, flags=re.MULTILINE))
    assert imported, f"no -X importtime output:\n{proc.stderr[-2000:]}"
    return proc, imported


def _command_names() -> list[str]:
    return [importlib.import_module(name).NAME for name in COMMAND_MODULES]


_STARTUP_CASES = [
    (["--help"], 0, "usage: earthmind-compat"),
    *(([name, "--help"], 0, f"usage: earthmind-compat {name}") for name in _command_names()),
    (["plan", "--gpu-memory", "24XB"], 2, "argument --gpu-memory: Cannot read the memory size '24XB'"),
    (["plan", "--backbone", "internvl2_5_4b", "--gpu-memory", "24XB"], 2, "argument --gpu-memory"),
    (["plan"], 2, "the following arguments are required: --backbone"),
    (["no-such-command"], 2, "invalid choice: 'no-such-command'"),
]


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("argv", "exit_code", "expected"), [pytest.param(*case, id=" ".join(case[0])) for case in _STARTUP_CASES]
)
def test_help_and_argument_errors_import_nothing_heavy(argv: list[str], exit_code: int, expected: str) -> None:
    """``--help``, each subcommand's ``--help`` and argument errors answer without torch or TerraTorch.

    Asserted on the modules the console script imports, not on wall time (that is a benchmark's job):
    importing TerraTorch alone takes over 10 s on a 2-core machine.
    """
    proc, imported = _run_console_script(*argv)
    assert proc.returncode == exit_code, proc.stderr[-2000:]
    output = proc.stdout if exit_code == 0 else proc.stderr
    assert expected in output, output
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY_MODULES)
    assert not heavy, f"earthmind-compat {' '.join(argv)} imported {heavy[:10]}"
    assert "earthmind_compat.registry" not in imported, "the package's __init__ (registration) ran"


@pytest.mark.reliability
@pytest.mark.slow  # a new Python process that imports TerraTorch
def test_console_script_runs_a_command_with_the_backbones_registered() -> None:
    """Past the parser the launcher runs the package's __init__, so a command sees the registered backbones."""
    proc, imported = _run_console_script("plan", "--backbone", "internvl2_5_4b", "--preset", "tiny", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["backbone"] == "internvl2_5_4b"
    assert {"terratorch", "earthmind_compat.registry"} <= imported
