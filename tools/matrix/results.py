"""Per-cell results: ``matrices/results/<cell>.json``, assembled from a compat run and validated.

``nox -s compat`` runs a cell, counts its pytest JUnit XML per test layer (:func:`junit_layers`), reads
``earthmind-compat check --json`` (:func:`read_check`) and writes the document :func:`build_result`
assembles. :func:`load_results` reads them all back and refuses any that is broken.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tools.matrix.cells import AXES, SCHEMA, Cell, MatrixError

RESULTS_DIR = Path("matrices/results")

#: Test layers in README order; they are the pytest markers registered in pyproject.toml.
LAYERS = ("registry", "shapes", "numerics", "benchmark", "e2e", "reliability", "gpu")
#: Layer name for tests that carry none of the layer markers.
UNMARKED = "unmarked"
#: Packages whose installed versions a result records.
VERSION_PACKAGES = (
    "torch",
    "torchvision",
    "terratorch",
    "transformers",
    "bitsandbytes",
    "peft",
    "numpy",
    "lightning",
    "timm",
    "segmentation-models-pytorch",
    "torchgeo",
    "jsonargparse",
    "safetensors",
    "huggingface-hub",
    "pytest",
    "earthmind-compat",
)
#: ``upstream``: nothing failed, but some tests are expected failures (``xfail(strict=True)``) for documented
#: upstream bugs. A strict xfail that passes (the upstream bug was fixed) is a failure, so the cell turns red.
STATUSES = ("pass", "upstream", "fail")
#: Counters every test layer carries; ``xfailed`` and ``xpassed`` were added later and default to 0 in files
#: written before them. An ``xpassed`` test is also counted in ``failed`` (pytest fails a strict XPASS).
COUNTS = ("passed", "failed", "skipped")
EXPECTED_COUNTS = ("xfailed", "xpassed")
_XPASS_STRICT = "[XPASS(strict)]"
ROW_STATUSES = ("pass", "fail", "skip")


def _junit_root(path: str | Path) -> ET.Element:
    """The root element of a JUnit XML file, or our error naming the file."""
    try:
        return ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise MatrixError(f"{path}: cannot read JUnit XML: {exc}") from exc


def junit_layers(path: str | Path) -> tuple[dict[str, dict[str, float]], list[dict[str, str]]]:
    """Count pass / fail / skip / xfail per test layer from a pytest JUnit XML file.

    The layer of a test case is read from its ``layers`` property, which the pytest plugin
    ``matrices/pytest_layers.py`` records from the test's markers (first layer in :data:`LAYERS` order);
    a case without it counts as :data:`UNMARKED`.

    Args:
        path: The ``--junitxml`` file.

    Returns:
        ``(layers, failures)``: per-layer ``passed/failed/skipped/xfailed/xpassed/seconds``, and one entry per
        failed or errored test with its layer and the first line of its message, sorted by test id. Expected
        failures (``<skipped type="pytest.xfail">``) are not failures; use :func:`junit_expected` for them.

    Raises:
        MatrixError: If the file cannot be parsed.
    """
    root = _junit_root(path)
    layers: dict[str, dict[str, float]] = {}
    failures: list[dict[str, str]] = []
    for case in root.iter("testcase"):
        layer = UNMARKED
        for prop in case.iter("property"):
            if prop.get("name") == "layers" and prop.get("value"):
                layer = prop.get("value", UNMARKED).split(",")[0]
        counts = layers.setdefault(layer, dict.fromkeys((*COUNTS, *EXPECTED_COUNTS), 0) | {"seconds": 0.0})
        counts["seconds"] += float(case.get("time", "0") or 0)
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            counts["failed"] += 1
            if (bad.get("message") or "").startswith(_XPASS_STRICT):
                counts["xpassed"] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            failures.append({"test": name, "layer": layer, "message": failure_message(bad)})
        elif skipped is not None and skipped.get("type") == "pytest.xfail":
            counts["xfailed"] += 1
        elif skipped is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    for counts in layers.values():
        counts["seconds"] = round(counts["seconds"], 1)
        for key in (*COUNTS, *EXPECTED_COUNTS):
            counts[key] = int(counts[key])
    failures.sort(key=lambda f: f["test"])
    return dict(sorted(layers.items(), key=lambda kv: _layer_order(kv[0]))), failures


def junit_expected(path: str | Path) -> list[dict[str, str]]:
    """The expected failures (strict xfails that failed as expected) of a JUnit XML file, with their reasons.

    Args:
        path: The ``--junitxml`` file.

    Returns:
        ``{"test", "reason"}`` per expected failure (the reason names the upstream bug), sorted by test id.

    Raises:
        MatrixError: If the file cannot be parsed.
    """
    root = _junit_root(path)
    expected = []
    for case in root.iter("testcase"):
        skipped = case.find("skipped")
        if skipped is not None and skipped.get("type") == "pytest.xfail":
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            expected.append({"test": name, "reason": _SITE_PACKAGES.sub("site-packages/", skipped.get("message", ""))})
    return sorted(expected, key=lambda e: e["test"])


_SITE_PACKAGES = re.compile(r"/\S*?/site-packages/")
_EXCEPTION_LINE = re.compile(r"^E\s+((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit)\b.*)$")


def failure_message(element: ET.Element) -> str:
    """The most telling line of a JUnit ``<failure>`` / ``<error>``: the innermost exception, else the message.

    pytest puts the whole traceback in the element's text; its last ``E   SomeError: ...`` line names the
    exception that actually happened (e.g. the error inside a subprocess whose output an assertion shows),
    which is what a reader of the matrix needs. Cut to 300 characters.
    """
    lines = [m.group(1).strip() for m in map(_EXCEPTION_LINE.match, (element.text or "").splitlines()) if m]
    if not lines:
        lines = (element.get("message") or element.text or "").strip().splitlines()[:1]
    # Environment-specific prefixes (a venv's site-packages) would make results differ between machines.
    return _SITE_PACKAGES.sub("site-packages/", lines[-1])[:300] if lines else ""


def _layer_order(layer: str) -> tuple[int, str]:
    return (LAYERS.index(layer) if layer in LAYERS else len(LAYERS), layer)


def read_check(path: str | Path) -> dict[str, Any]:
    """Read the JSON written by ``earthmind-compat check --json`` and keep what a result needs.

    Args:
        path: The check JSON file.

    Returns:
        ``{"passed", "failed", "skipped", "rows"}`` with rows sorted by backbone, feature.

    Raises:
        MatrixError: If the file is missing or malformed.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise MatrixError(f"{path}: cannot read check JSON: {exc}") from exc
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise MatrixError(f"{path}: check JSON has no 'rows' list")
    kept = []
    for row in rows:
        try:
            kept.append(
                {
                    "backbone": str(row["backbone"]),
                    "feature": str(row["feature"]),
                    "status": str(row["status"]),
                    "detail": str(row.get("detail", ""))[:300],
                    "seconds": round(float(row.get("seconds", 0.0)), 2),
                }
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MatrixError(f"{path}: malformed check row {row!r}") from exc
    kept.sort(key=lambda r: (r["backbone"], r["feature"]))
    return {
        "passed": sum(r["status"] == "pass" for r in kept),
        "failed": sum(r["status"] == "fail" for r in kept),
        "skipped": sum(r["status"] == "skip" for r in kept),
        "rows": kept,
    }


def build_result(
    cell: Cell,
    *,
    versions: Mapping[str, str],
    declared: Mapping[str, Any],
    install: Mapping[str, Any],
    tests: Mapping[str, Any] | None = None,
    check: Mapping[str, Any] | None = None,
    durations: Mapping[str, float] | None = None,
    source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble one cell's result document (the content of ``matrices/results/<cell>.json``).

    Args:
        cell: The cell that was run.
        versions: Installed versions (``python`` plus :data:`VERSION_PACKAGES`).
        declared: ``{"ok": bool, "detail": str}``: whether the package's own requirements admit the pins.
        install: ``{"ok": bool, "detail": str}``: whether the cell's environment could be installed.
        tests: ``{"exit_code", "detail", "layers", "failures", "expected"}`` from the pytest run, or ``None``.
        check: ``{"exit_code", "detail", ...}`` plus :func:`read_check` output, or ``None``.
        durations: Wall seconds per phase.
        source: What code was tested, e.g. ``{"commit": sha, "dirty": bool}`` (a run tests the work tree).

    Returns:
        The result document; ``status`` is ``"pass"`` only if install, every test and every check row
        passed (a pin outside the package's declared range is reported, not failed), ``"upstream"`` if so
        but some tests failed as expected (documented upstream bugs), ``"fail"`` otherwise.
    """
    layers = dict((tests or {}).get("layers", {}))
    test_summary = {key: int(sum(int(c.get(key, 0)) for c in layers.values())) for key in (*COUNTS, *EXPECTED_COUNTS)}
    tests_doc = {
        "exit_code": (tests or {}).get("exit_code"),
        "detail": str((tests or {}).get("detail", "not run")),
        **test_summary,
        "layers": layers,
        "failures": list((tests or {}).get("failures", [])),
        "expected": list((tests or {}).get("expected", [])),
    }
    check_doc = {
        "exit_code": (check or {}).get("exit_code"),
        "detail": str((check or {}).get("detail", "not run")),
        "passed": int((check or {}).get("passed", 0)),
        "failed": int((check or {}).get("failed", 0)),
        "skipped": int((check or {}).get("skipped", 0)),
        "rows": list((check or {}).get("rows", [])),
    }
    ok = (
        bool(install.get("ok"))
        and tests is not None
        and tests_doc["exit_code"] == 0
        and test_summary["failed"] == 0
        and test_summary["passed"] > 0
        and check is not None
        and check_doc["exit_code"] == 0
        and check_doc["failed"] == 0
        and check_doc["passed"] > 0
    )
    return {
        "schema": SCHEMA,
        "cell": cell.id,
        "requested": {axis: getattr(cell, axis) for axis in AXES}
        | {"pins": list(cell.pins), "resolution": cell.resolution},
        "versions": dict(sorted(versions.items())),
        "declared": {"ok": bool(declared.get("ok")), "detail": str(declared.get("detail", ""))},
        "install": {"ok": bool(install.get("ok")), "detail": str(install.get("detail", ""))},
        "tests": tests_doc,
        "check": check_doc,
        "durations": {k: round(float(v), 1) for k, v in sorted((durations or {}).items())},
        "source": dict(source or {}),
        "status": ("upstream" if test_summary["xfailed"] else "pass") if ok else "fail",
    }


def dumps(data: Any) -> str:
    """Serialize JSON the one way every file here is written: sorted keys, 2-space indent, final newline."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def validate_result(data: Any, cell_id: str | None = None) -> list[str]:
    """List what is wrong with a result document (empty when it is valid).

    Args:
        data: The parsed JSON.
        cell_id: The id the document must carry (from its file name), if known.

    Returns:
        Human-readable problems.
    """
    if not isinstance(data, dict):
        return ["not a JSON object"]
    problems = []
    if data.get("schema") != SCHEMA:
        problems.append(f"schema is {data.get('schema')!r}, expected {SCHEMA}")
    if cell_id is not None and data.get("cell") != cell_id:
        problems.append(f"cell is {data.get('cell')!r}, expected {cell_id!r} (from the file name)")
    if data.get("status") not in STATUSES:
        problems.append(f"status is {data.get('status')!r}, expected one of {STATUSES}")
    for key in ("requested", "versions", "declared", "install", "tests", "check", "durations"):
        if not isinstance(data.get(key), dict):
            problems.append(f"'{key}' must be an object")
    if problems:
        return problems
    tests, check = data["tests"], data["check"]
    for name, block in (("tests", tests), ("check", check)):
        for key in ("passed", "failed", "skipped"):
            if not isinstance(block.get(key), int) or block[key] < 0:
                problems.append(f"{name}.{key} must be a non-negative integer")
    for key in EXPECTED_COUNTS:
        if not isinstance(tests.get(key, 0), int) or tests.get(key, 0) < 0:
            problems.append(f"tests.{key} must be a non-negative integer")
    layers = tests.get("layers")
    if not isinstance(layers, dict):
        problems.append("tests.layers must be an object")
    else:
        for layer, counts in layers.items():
            if not isinstance(counts, dict) or not all(
                isinstance(counts.get(k), int) and counts[k] >= 0 for k in ("passed", "failed", "skipped")
            ):
                problems.append(f"tests.layers.{layer} needs non-negative integer passed/failed/skipped")
        if not problems:
            for key in (*COUNTS, *EXPECTED_COUNTS):
                total = sum(c.get(key, 0) for c in layers.values())
                if total != tests.get(key, 0):
                    problems.append(f"tests.{key} is {tests[key]} but the layers add up to {total}")
    rows = check.get("rows")
    if not isinstance(rows, list):
        problems.append("check.rows must be a list")
    else:
        for index, row in enumerate(rows):
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("backbone", "feature")):
                problems.append(f"check.rows[{index}] needs string backbone and feature")
            elif row.get("status") not in ROW_STATUSES:
                problems.append(f"check.rows[{index}].status is {row.get('status')!r}")
        if not problems:
            for key, status in (("passed", "pass"), ("failed", "fail"), ("skipped", "skip")):
                total = sum(r["status"] == status for r in rows)
                if total != check[key]:
                    problems.append(f"check.{key} is {check[key]} but the rows count {total}")
    if not problems and data["status"] in ("pass", "upstream"):
        status = data["status"]
        if tests["failed"] or check["failed"] or not data["install"].get("ok"):
            problems.append(f"status is '{status}' but a test, a check row or the install failed")
        if not tests["passed"] or not check["passed"]:
            problems.append(f"status is '{status}' but no test or no check row passed")
        if (status == "upstream") != bool(tests.get("xfailed", 0)):
            problems.append(f"status is '{status}' but {tests.get('xfailed', 0)} tests failed as expected")
    return problems


def load_results(cells: Sequence[Cell], results_dir: str | Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """Load and validate every result file.

    Args:
        cells: The declared cells.
        results_dir: Directory of ``<cell>.json`` files.

    Returns:
        Results by cell id (cells without a file are absent).

    Raises:
        MatrixError: Listing every broken file, every result for an unknown or excluded cell.
    """
    results_dir = Path(results_dir)
    known = {cell.id: cell for cell in cells}
    results: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    for path in sorted(results_dir.glob("*.json")) if results_dir.is_dir() else []:
        cell_id = path.name[: -len(".json")]
        if cell_id not in known:
            errors.append(f"{path}: no cell {cell_id!r} in the cells file")
            continue
        if not known[cell_id].active:
            errors.append(f"{path}: cell {cell_id!r} is excluded ({known[cell_id].excluded}) but has a result")
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            errors.append(f"{path}: not valid JSON: {exc}")
            continue
        problems = validate_result(data, cell_id)
        if problems:
            errors.extend(f"{path}: {problem}" for problem in problems)
            continue
        results[cell_id] = data
    if errors:
        raise MatrixError("broken result files:\n  " + "\n  ".join(errors))
    return results
