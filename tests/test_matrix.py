"""The compatibility matrix tooling: one source of truth, deterministic rendering, loud failures.

- the nox `compat` sessions, the GitHub workflow matrix and ``matrices/cells.toml`` cannot drift apart;
- rendering is byte-identical and the committed README table / badges / heatmap are up to date;
- a broken result file is reported with its name and the problem, never rendered.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest
import yaml

# the certification outputs (cells, results, table, badges, workflows) are consistent and reproducible
pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"


def _import_matrix_tooling() -> ModuleType:
    """Import ``tools.matrix`` from the repository root, as ``python -m tools.matrix`` and the noxfile do."""
    if str(ROOT) not in sys.path:  # pytest puts tests/ on sys.path, not the root; tools/ is not installed
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("tools.matrix")


matrix = _import_matrix_tooling()


def _workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))


def _nox_listing(*args: str) -> list[dict]:
    import nox  # noqa: F401  (in the test extra: a missing nox is a failure, not a skip)

    proc = subprocess.run(
        [sys.executable, "-m", "nox", "-l", "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ------------------------------------------------------------------------------------- the cells file


def test_cells_file_covers_the_required_axes() -> None:
    cells = matrix.load_cells(ROOT / matrix.CELLS_FILE)
    active = matrix.active_cells(cells)
    assert [c.resolution for c in active].count("highest") == 1, "one latest cell (the weekly workflow runs it)"
    assert [c.resolution for c in active].count("lowest-direct") == 1, "one cell at the declared floors"
    for axis in ("peft", "bitsandbytes"):  # named axes: the oldest supported and the newest
        assert len({getattr(c, axis) for c in active if getattr(c, axis)}) >= 2, axis
    active = [c for c in active if c.resolution == "pinned"]
    combos = {(c.terratorch, c.torch, c.python) for c in active}
    assert ("1.0.2", "2.7.0", "3.11") in combos  # TerraTorch 1.0.2 with its own torch pin
    assert any(c.terratorch == "1.1.1" for c in active)
    assert ("1.2.11", "2.14.1", "3.11") in combos  # the dev venv
    assert any(c.terratorch == "1.2.13" and c.python == "3.12" for c in active)
    majors = {c.transformers.split(".")[0] for c in active}
    assert majors == {"4", "5"}, "the transformers axis needs a 4.x and a 5.x cell"
    for cell in cells:
        if not cell.active:
            assert len(cell.excluded) > 20, f"{cell.id}: an excluded cell needs a real reason"


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ('id = "a"\npython = "3.11"', "'torch' must be a non-empty string"),
        ('id = "a"\npython = "3.11"\nresolution = "newest"', "resolution must be one of"),
        ('id = "a"\npython = "3.11"\nresolution = "highest"\ntorch = "2.7.0"', "resolves its versions"),
        ('id = "a"\npython="3.11"\ntorch="1"\ntorchvision="1"\nterratorch="1"\ntransformers="1"\npeft=""', "'peft'"),
        ('id = "bad id"\npython="3.11"\ntorch="1"\ntorchvision="1"\nterratorch="1"\ntransformers="1"', "may only use"),
        ('id = "a"\npython="311"\ntorch="1"\ntorchvision="1"\nterratorch="1"\ntransformers="1"', "python must look"),
        (
            'id = "a"\npython="3.11"\ntorch="1"\ntorchvision="1"\nterratorch="1"\ntransformers="1"\nexcluded=""',
            "reason",
        ),
        (
            'id = "a"\npython="3.11"\ntorch="1"\ntorchvision="1"\nterratorch="1"\ntransformers="1"\ncolour="x"',
            "unknown",
        ),
    ],
)
def test_malformed_cell_is_rejected(tmp_path: Path, snippet: str, message: str) -> None:
    path = tmp_path / "cells.toml"
    path.write_text(f"schema = 1\n[[cell]]\n{snippet}\n", encoding="utf-8")
    with pytest.raises(matrix.MatrixError, match=message):
        matrix.load_cells(path)


def test_resolved_cells_pin_nothing_and_pass_their_resolution_to_uv(tmp_path: Path) -> None:
    path = tmp_path / "cells.toml"
    path.write_text(
        'schema = 1\n[[cell]]\nid = "new"\npython = "3.12"\nresolution = "highest"\n'
        '[[cell]]\nid = "low"\npython = "3.11"\nresolution = "lowest-direct"\npins = ["numpy<2"]\n'
        '[[cell]]\nid = "p"\npython="3.11"\ntorch="2"\ntorchvision="1"\nterratorch="1"\ntransformers="4"\n'
        'peft="0.15.0"\n',
        encoding="utf-8",
    )
    new, low, pinned = matrix.load_cells(path)
    assert new.requirements() == [] and new.resolver_options() == ["--upgrade"]
    assert low.requirements() == ["numpy<2"] and low.resolver_options() == ["--resolution", "lowest-direct"]
    assert "peft==0.15.0" in pinned.requirements() and "bitsandbytes" not in " ".join(pinned.requirements())


def test_duplicate_cell_id_is_rejected(tmp_path: Path) -> None:
    cell = 'id = "a"\npython="3.11"\ntorch="1"\ntorchvision="1"\nterratorch="1"\ntransformers="1"\n'
    path = tmp_path / "cells.toml"
    path.write_text(f"schema = 1\n[[cell]]\n{cell}[[cell]]\n{cell}", encoding="utf-8")
    with pytest.raises(matrix.MatrixError, match="duplicate id 'a'"):
        matrix.load_cells(path)


# ------------------------------------------------------------------------ nox / workflow / cells drift


def test_nox_compat_sessions_are_exactly_the_active_cells() -> None:
    listing = _nox_listing("-s", "compat")
    gha = matrix.github_matrix(listing)["include"]
    cells = matrix.active_cells(matrix.load_cells(ROOT / matrix.CELLS_FILE))
    assert [(e["cell"], e["python"]) for e in gha] == [(c.id, c.python) for c in cells]
    assert [e["session"] for e in gha] == [f"compat(cell={c.id!r})" for c in cells]


def test_compat_workflow_takes_its_matrix_from_nox() -> None:
    workflow = _workflow("compat.yml")
    jobs = workflow["jobs"]
    listing_steps = [s for s in jobs["cells"]["steps"] if "run" in s and "nox -l --json -s compat" in s["run"]]
    assert len(listing_steps) == 1, "the cells job must list the sessions with `nox -l --json -s compat`"
    assert "python -m tools.matrix gha-matrix" in listing_steps[0]["run"]
    assert jobs["cells"]["outputs"]["matrix"] == f"${{{{ steps.{listing_steps[0]['id']}.outputs.matrix }}}}"
    compat = jobs["compat"]
    assert compat["needs"] == "cells"
    assert compat["strategy"]["matrix"] == "${{ fromJSON(needs.cells.outputs.matrix) }}"
    runs = [s for s in compat["steps"] if "run" in s and "nox -s" in s["run"]]
    assert len(runs) == 1
    assert runs[0]["env"]["SESSION"] == "${{ matrix.session }}"
    assert '-s "$SESSION"' in runs[0]["run"]
    setup = [s for s in compat["steps"] if str(s.get("uses", "")).startswith("actions/setup-python@")]
    assert "${{ matrix.python }}" in setup[0]["with"]["python-version"]
    # No cell id may be spelled out in any workflow: the only list is matrices/cells.toml.
    text = "\n".join(p.read_text(encoding="utf-8") for p in WORKFLOWS.glob("*.yml"))
    for cell in matrix.load_cells(ROOT / matrix.CELLS_FILE):
        assert cell.id not in text, f"{cell.id} is hard-coded in a workflow"


def test_tests_workflow_runs_every_layer_once() -> None:
    """The tests workflow shards the suite by layer: its matrix is exactly conftest's layers but ``gpu``."""
    from conftest import LAYERS

    job = _workflow("tests.yml")["jobs"]["tests"]
    assert sorted(job["strategy"]["matrix"]["layer"]) == sorted(LAYERS - {"gpu"})
    runs = [s for s in job["steps"] if "run" in s and "nox -s tests" in s["run"]]
    assert len(runs) == 1 and runs[0]["env"]["LAYER"] == "${{ matrix.layer }}"
    assert '-m "${LAYER} and not gpu"' in runs[0]["run"]


def test_gha_matrix_pipeline_matches_nox(tmp_path: Path) -> None:
    """Run the workflow's own pipeline (`nox -l --json -s compat | python -m tools.matrix gha-matrix`)."""
    listing = json.dumps(_nox_listing("-s", "compat"))
    proc = subprocess.run(
        [sys.executable, "-m", "tools.matrix", "gha-matrix"],
        input=listing,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    emitted = json.loads(proc.stdout)["include"]
    cells = matrix.active_cells(matrix.load_cells(ROOT / matrix.CELLS_FILE))
    assert {e["cell"] for e in emitted} == {c.id for c in cells}
    assert len(emitted) == len(cells)


def test_matrix_commands_named_in_the_repository_exist() -> None:
    """Docs, cells file, noxfile and workflows name only `python -m tools.matrix` subcommands that exist."""
    paths = [
        ROOT / "README.md",
        ROOT / "noxfile.py",
        *sorted((ROOT / "matrices").glob("*.*")),
        *WORKFLOWS.glob("*.yml"),
    ]
    texts = {
        p.relative_to(ROOT): p.read_text(encoding="utf-8") for p in paths if p.suffix in (".md", ".py", ".toml", ".yml")
    }
    named = set()
    for path, text in texts.items():
        assert "earthmind-compat matrix" not in text, f"{path} names `earthmind-compat matrix`, which does not exist"
        assert "earthmind_compat/matrix.py" not in text, f"{path} names earthmind_compat/matrix.py (now tools/matrix/)"
        named |= {(path, sub) for sub in re.findall(r"-m tools\.matrix ([a-z][a-z-]*)", text)}
    assert named, "no file runs python -m tools.matrix"
    for path, sub in sorted(named):
        assert matrix.build_parser().parse_args([sub]).command == sub, f"{path}: `python -m tools.matrix {sub}`"


def test_every_nox_session_named_in_a_workflow_exists() -> None:
    named = set()
    for path in WORKFLOWS.glob("*.yml"):
        named |= set(re.findall(r"nox -s ([A-Za-z_]+)", path.read_text(encoding="utf-8")))
    assert named, "no workflow runs a nox session"
    sessions = {entry["name"] for entry in _nox_listing("-s", *sorted(named))}
    assert named <= sessions, f"workflows name unknown nox sessions: {sorted(named - sessions)}"
    assert {"tests", "lint", "render", "gpu_benchmarks"} <= named


def test_latest_workflow_runs_the_highest_resolution_cell_weekly_and_reports_failures() -> None:
    workflow = _workflow("compat-latest.yml")
    triggers = workflow.get("on", workflow.get(True))  # PyYAML reads a bare `on:` key as True
    assert set(triggers) == {"schedule", "workflow_dispatch"}
    (cron,) = (entry["cron"] for entry in triggers["schedule"])
    assert cron.split()[2:] == ["*", "*", "1"], "weekly"
    assert workflow["permissions"] == {"contents": "read"}
    # the cell is found by its resolution, never by a spelled-out id (the drift check above covers this file too)
    (run,) = (s for s in workflow["jobs"]["latest"]["steps"] if "nox -s" in s.get("run", ""))
    assert "-m tools.matrix cells --resolution highest" in run["run"] and "compat(cell='$cell')" in run["run"]
    proc = subprocess.run(
        [sys.executable, "-m", "tools.matrix", "cells", "--resolution", "highest"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    (cell_id,) = proc.stdout.split()
    assert f"compat(cell={cell_id!r})" in {e["session"] for e in _nox_listing("-s", "compat")}
    report = workflow["jobs"]["report"]
    assert report["needs"] == "latest" and "needs.latest.result == 'failure'" in report["if"]
    assert report["permissions"] == {"issues": "write"}
    script = report["steps"][-1]["run"]
    assert "gh issue list --label compat-latest --state open" in script
    assert "gh issue comment" in script and "gh issue create" in script


def test_gpu_job_runs_on_a_self_hosted_gpu_runner_and_never_on_pull_requests() -> None:
    workflow = _workflow("gpu.yml")
    job = workflow["jobs"]["gpu-benchmarks"]
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    assert any("nox -s gpu_benchmarks" in s.get("run", "") for s in job["steps"])
    triggers = workflow.get("on", workflow.get(True))  # PyYAML reads a bare `on:` key as True
    assert "pull_request" not in triggers and "pull_request_target" not in triggers


# ----------------------------------------------------------------------------------------- results


def _cell(cell_id: str = "c1", **kw: str) -> object:
    fields = {"python": "3.11", "torch": "2.14.1", "torchvision": "0.29.1", "terratorch": "1.2.11"}
    fields.update({"transformers": "5.23.0", **kw})
    return matrix.Cell(id=cell_id, **fields)


def _result(cell: object, *, test_fail: int = 0, check_fail: int = 0, xfail: int = 0) -> dict:
    layers = {"registry": {"passed": 3, "failed": test_fail, "skipped": 1, "seconds": 1.5, "xfailed": xfail}}
    expected = [{"test": "tests/test_x.py::test_b", "reason": "upstream: lib (#1)"}] * xfail
    failures = [{"test": "tests/test_x.py::test_a", "layer": "registry", "message": "boom"}] * test_fail
    rows = [{"backbone": "b", "feature": "forward", "status": "pass", "detail": "ok", "seconds": 0.1}]
    rows += [
        {"backbone": "b", "feature": "lora", "status": "fail", "detail": "bad | pipe", "seconds": 0.1}
    ] * check_fail
    check = {"exit_code": 1 if check_fail else 0, "detail": "", "rows": rows}
    check.update({"passed": 1, "failed": check_fail, "skipped": 0})
    return matrix.build_result(
        cell,
        versions={"python": "3.11.7", "torch": cell.torch},
        declared={"ok": True},
        install={"ok": True},
        tests={
            "exit_code": 1 if test_fail else 0,
            "detail": "",
            "layers": layers,
            "failures": failures,
            "expected": expected,
        },
        check=check,
        durations={"total": 12.34},
    )


def test_build_result_status_follows_the_counts() -> None:
    cell = _cell()
    assert _result(cell)["status"] == "pass"
    assert _result(cell, test_fail=1)["status"] == "fail"
    assert _result(cell, check_fail=1)["status"] == "fail"
    assert matrix.validate_result(_result(cell, test_fail=1), "c1") == []
    upstream = _result(cell, xfail=2)
    assert upstream["status"] == "upstream" and upstream["tests"]["xfailed"] == 2
    assert matrix.validate_result(upstream, "c1") == []
    assert _result(cell, xfail=2, test_fail=1)["status"] == "fail"  # ours fails too (or an xfail XPASSed)
    assert "status is 'pass' but 2 tests failed as expected" in matrix.validate_result({**upstream, "status": "pass"})


def test_tested_ranges_come_from_the_passing_results_installed_versions() -> None:
    low, high, broken = _cell("low"), _cell("high"), _cell("broken")
    results = {
        "low": _result(low) | {"versions": {"torch": "2.7.0+cu126", "transformers": "4.52.1"}},
        "high": _result(high, xfail=1) | {"versions": {"torch": "2.15.0", "transformers": "5.24.0"}},
        "broken": _result(broken, test_fail=1) | {"versions": {"torch": "2.5.0", "transformers": "6.0.0"}},
    }
    ranges = matrix.tested_ranges([low, high, broken], results)
    assert ranges["torch"] == {"low": "2.7.0", "low_cell": "low", "high": "2.15.0", "high_cell": "high"}
    assert ranges["transformers"] == {"low": "4.52.1", "low_cell": "low", "high": "5.24.0", "high_cell": "high"}
    table = matrix.render_table([low, high, broken], results)
    assert "| transformers | 4.52.1 | `low` | 5.24.0 | `high` |" in table


def test_the_package_warns_outside_the_committed_results() -> None:
    """One source of truth: the package's tested ranges are the ones the committed results prove."""
    from earthmind_compat import compat

    cells = matrix.load_cells(ROOT / matrix.CELLS_FILE)
    derived = matrix.tested_ranges(cells, matrix.load_results(cells, ROOT / matrix.RESULTS_DIR))
    assert {package: (e["low"], e["high"]) for package, e in derived.items()} == compat.TESTED_RANGES
    assert set(compat.TESTED_RANGES) == set(matrix.SUPPORT_PACKAGES)


def test_every_upstream_bug_is_listed_in_the_readme_troubleshooting() -> None:
    from upstream_bugs import UPSTREAM_BUGS

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Troubleshooting") :]
    section = section[: section.index("\n## ", 3)]
    for bug in UPSTREAM_BUGS:
        assert f"upstream bug, {bug.package} {bug.affected.split(' (')[0]}" in section, bug
        assert bug.reference in section, bug


def test_upstream_cell_is_drawn_apart_from_pass_and_fail() -> None:
    cell = _cell()
    tones = {
        name: matrix.summarize(cell, result).tone
        for name, result in (
            ("pass", _result(cell)),
            ("upstream", _result(cell, xfail=1)),
            ("fail", _result(cell, test_fail=1)),
        )
    }
    assert tones == {"pass": "pass", "upstream": "upstream", "fail": "fail"}
    assert len({matrix.COLORS[t] for t in tones.values()}) == 3
    assert len({matrix.SHIELDS_COLORS[t] for t in tones.values()}) == 3
    results = {"c1": _result(cell, xfail=1)}
    table = matrix.render_table([cell], results)
    assert "🔷 3/3 +1 xfail" in table and "upstream: lib (#1)" in table
    _, _, values = matrix.heatmap_matrix([cell], results)
    assert values[0][0] == matrix.rendering.UPSTREAM_VALUE
    _, _, values = matrix.heatmap_matrix([cell], {"c1": _result(cell, xfail=1, test_fail=1)})
    assert values[0][0] == 0.75


def _write_repo(root: Path, cells: list, results: dict[str, dict], readme: str | None = None) -> None:
    (root / "matrices" / "results").mkdir(parents=True)
    lines = ["schema = 1"]
    for cell in cells:
        lines += ["[[cell]]", *(f'{k} = "{getattr(cell, k)}"' for k in ("id", *matrix.AXES))]
        if cell.excluded:
            lines.append(f'excluded = "{cell.excluded}"')
    (root / "matrices" / "cells.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for cell_id, result in results.items():
        (root / "matrices" / "results" / f"{cell_id}.json").write_text(matrix.dumps(result), encoding="utf-8")
    if readme is not None:
        (root / "README.md").write_text(readme, encoding="utf-8")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_render_is_byte_identical_and_idempotent(tmp_path: Path) -> None:
    cells = [_cell("c1"), _cell("c2", transformers="4.52.1"), _cell("c3", excluded="cannot resolve here"), _cell("c4")]
    results = {"c1": _result(cells[0]), "c2": _result(cells[1], test_fail=2, check_fail=1)}
    readme = f"# Title\n\nintro\n\n{matrix.START_MARKER}\nold table\n{matrix.END_MARKER}\n\nafter\n"
    first, second = tmp_path / "a", tmp_path / "b"
    for root in (first, second):
        _write_repo(root, cells, results, readme)
        written = matrix.render(root)
        assert matrix.README_FILE in written and matrix.HEATMAP_FILE in written
    assert _snapshot(first) == _snapshot(second)
    assert matrix.render(first, check=True) == []
    assert matrix.render(first) == []  # a second render changes nothing
    text = (first / "README.md").read_text(encoding="utf-8")
    assert text.startswith("# Title\n\nintro\n\n") and text.endswith("\n\nafter\n")
    assert "old table" not in text
    assert "`c3`: excluded: cannot resolve here" in text
    assert "bad \\| pipe" in text  # table-breaking characters are escaped
    assert (first / "matrices" / "badges" / "c4.svg").read_text().count("not run") >= 1
    assert json.loads((first / "matrices" / "badges" / "c2.json").read_text())["color"] == "red"
    assert json.loads((first / "matrices" / "badges" / "c1.json").read_text()) == {
        "color": "brightgreen",
        "label": "c1",
        "message": "4/4 passed",
        "schemaVersion": 1,
    }
    for badge in (first / "matrices" / "badges").glob("*.svg"):
        ET.fromstring(badge.read_text(encoding="utf-8"))  # well-formed XML
    assert (first / "matrices" / "heatmap.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_render_check_reports_a_stale_output(tmp_path: Path) -> None:
    cell = _cell("c1")
    _write_repo(tmp_path, [cell], {"c1": _result(cell)})
    matrix.render(tmp_path)
    results_file = tmp_path / "matrices" / "results" / "c1.json"
    results_file.write_text(matrix.dumps(_result(cell, test_fail=1)), encoding="utf-8")
    stale = matrix.render(tmp_path, check=True)
    assert matrix.BADGES_DIR / "c1.svg" in stale and matrix.TABLE_FILE in stale
    assert matrix.main(["render", "--check", "--root", str(tmp_path)]) == 1


def test_committed_outputs_are_up_to_date() -> None:
    """README table, badges and heatmap regenerate byte for byte from the committed results."""
    outputs = matrix.render_outputs(ROOT)
    pinned = dict(d.split("==") for d in _noxfile_render_deps())
    # PNG bytes depend on the matplotlib release and SVG badges on the anybadge release: byte equality is
    # only promised for the pinned ones (`nox -s render` installs them); otherwise the file must be committed.
    drawn_by = {matrix.HEATMAP_FILE: "matplotlib", **{rel: "anybadge" for rel in outputs if rel.suffix == ".svg"}}
    for rel, content in sorted(outputs.items()):
        library = drawn_by.get(rel)
        if library is not None and metadata.version(library) != pinned[library]:
            assert (ROOT / rel).exists(), f"{rel} is not committed"
            continue
        assert (ROOT / rel).read_bytes() == content, f"{rel} is stale: run `nox -s render`"


def _noxfile_render_deps() -> tuple[str, ...]:
    text = (ROOT / "noxfile.py").read_text(encoding="utf-8")
    found = re.search(r"RENDER_DEPS = \(([^)]*)\)", text)
    assert found is not None
    return tuple(re.findall(r'"([^"]+)"', found.group(1)))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda path, data: path.write_text("{not json", encoding="utf-8"), "not valid JSON"),
        (lambda path, data: path.write_text(matrix.dumps({**data, "cell": "other"})), "expected 'c1'"),
        (lambda path, data: path.write_text(matrix.dumps({**data, "status": "green"})), "status is 'green'"),
        (
            lambda path, data: path.write_text(matrix.dumps({**data, "tests": {**data["tests"], "passed": 99}})),
            "add up",
        ),
        (
            lambda path, data: path.write_text(matrix.dumps({**data, "check": {**data["check"], "failed": 3}})),
            "rows count",
        ),
        (
            lambda path, data: path.write_text(matrix.dumps({**_result(_cell(), test_fail=1), "status": "pass"})),
            "status is 'pass' but",
        ),
        (lambda path, data: path.with_name("ghost.json").write_text(matrix.dumps(data)), "no cell 'ghost'"),
        (lambda path, data: path.with_name("c2.json").write_text(matrix.dumps(data)), "is excluded"),
    ],
    ids=["json", "cell", "status", "layers", "rows", "pass-with-failures", "orphan", "excluded"],
)
def test_broken_result_file_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture, mutate, message: str) -> None:
    cells = [_cell("c1"), _cell("c2", excluded="not here")]
    data = _result(cells[0])
    _write_repo(tmp_path, cells, {"c1": data}, f"{matrix.START_MARKER}\n{matrix.END_MARKER}\n")
    mutate(tmp_path / "matrices" / "results" / "c1.json", data)
    with pytest.raises(matrix.MatrixError, match=re.escape(message)):
        matrix.render(tmp_path)
    assert matrix.main(["render", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "results/" in err and message in err
    assert not (tmp_path / "matrices" / "badges").exists(), "nothing may be rendered from a broken result"


def test_readme_markers_must_be_intact(tmp_path: Path) -> None:
    cell = _cell("c1")
    _write_repo(tmp_path, [cell], {"c1": _result(cell)}, f"{matrix.END_MARKER}\n{matrix.START_MARKER}\n")
    with pytest.raises(matrix.MatrixError, match="comes before"):
        matrix.render(tmp_path)


# ------------------------------------------------------------------------------ JUnit layer counting


def test_layer_plugin_and_junit_counting(tmp_path: Path) -> None:
    """Run a real pytest with the compat session's plugin and count the JUnit XML per layer."""
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "@pytest.mark.registry\ndef test_ok():\n    pass\n"
        "@pytest.mark.numerics\n@pytest.mark.slow\ndef test_bad():\n    assert 1 == 2, 'numbers differ'\n"
        "@pytest.mark.registry\n@pytest.mark.skip(reason='no')\ndef test_skip():\n    pass\n"
        "def test_plain():\n    pass\n"
        "@pytest.mark.shapes\n@pytest.mark.xfail(reason='upstream: lib 1.0 (#1)', strict=True)\n"
        "def test_known():\n    assert False\n"
        "@pytest.mark.shapes\n@pytest.mark.xfail(reason='upstream: lib 1.1 (#2)', strict=True)\n"
        "def test_fixed():\n    pass\n",
        encoding="utf-8",
    )
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n registry\n numerics\n shapes\n slow\n", encoding="utf-8"
    )
    junit = tmp_path / "junit.xml"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "matrices")}
    subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "pytest_layers", "-p", "no:randomly", "-p", "no:cacheprovider"),
            *("-o", "junit_family=xunit1", f"--junitxml={junit}", "-q", str(tmp_path)),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        check=False,
    )
    layers, failures = matrix.junit_layers(junit)
    zero = {"xfailed": 0, "xpassed": 0, "seconds": 0}
    assert layers["registry"] | {"seconds": 0} == {"passed": 1, "failed": 0, "skipped": 1} | zero
    assert layers["numerics"]["failed"] == 1 and layers["numerics"]["passed"] == 0
    assert layers[matrix.UNMARKED]["passed"] == 1
    # an expected failure is neither a failure nor a skip; a strict XPASS (upstream fixed it) is a failure
    assert layers["shapes"] | {"seconds": 0} == {
        "passed": 0,
        "failed": 1,
        "skipped": 0,
        "xfailed": 1,
        "xpassed": 1,
        "seconds": 0,
    }
    assert [f["layer"] for f in failures] == ["numerics", "shapes"]
    assert "numbers differ" in failures[0]["message"]
    assert matrix.junit_expected(junit) == [{"test": "test_sample::test_known", "reason": "upstream: lib 1.0 (#1)"}]


def test_failure_message_names_the_innermost_exception() -> None:
    failure = ET.fromstring(
        '<failure message="AssertionError: some warning noise">'
        "def test():\n"
        "E       AssertionError: /x/venv/lib/python3.11/site-packages/a.py:1: SyntaxWarning: noise\n"
        'E           File "/x/venv/lib/python3.11/site-packages/t/necks.py", line 10\n'
        "E         ImportError: cannot import name 'Neck' (/x/venv/lib/python3.11/site-packages/t/necks.py)\n"
        "E       assert 1 == 0\n"
        "</failure>"
    )
    assert matrix.failure_message(failure) == "ImportError: cannot import name 'Neck' (site-packages/t/necks.py)"
    plain = ET.fromstring('<failure message="first line&#10;second">no exception lines</failure>')
    assert matrix.failure_message(plain) == "first line"


def test_unreadable_junit_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "junit.xml").write_text("<testsuites><testcase", encoding="utf-8")
    with pytest.raises(matrix.MatrixError, match="cannot read JUnit XML"):
        matrix.junit_layers(tmp_path / "junit.xml")


def test_badge_width_follows_the_text() -> None:
    short = ET.fromstring(matrix.badge_svg("a", "ok", "#4c1"))
    long = ET.fromstring(matrix.badge_svg("a much longer label", "123/456 passed", "#4c1"))
    assert int(long.get("width")) > int(short.get("width")) + 100
    assert "&lt;b&gt;" in matrix.badge_svg("<b>", "x", "#4c1")
