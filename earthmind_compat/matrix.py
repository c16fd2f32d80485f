"""The compatibility matrix: cells, per-cell results, and what is rendered from them.

``matrices/cells.toml`` is the single source of truth for the cells (Python x torch x TerraTorch x
transformers). ``nox -s compat`` runs each cell and writes ``matrices/results/<cell>.json`` through
:func:`build_result`; :func:`render` turns the committed results into

- the table spliced into ``README.md`` between ``<!-- compat-table:start -->`` and
  ``<!-- compat-table:end -->`` (also written alone to ``matrices/table.md``),
- one SVG badge per cell (``matrices/badges/<cell>.svg``, drawn from a template here, no network) and
  its shields.io endpoint JSON (``matrices/badges/<cell>.json``),
- a PNG heatmap of cell x feature (``matrices/heatmap.png``).

Everything rendered is a pure function of ``cells.toml`` and the result files: no timestamps, sorted
keys, fixed ordering, so regenerating from committed results is byte-identical.

This module imports only the standard library at import time (matplotlib only when drawing the
heatmap), so the noxfile and the GitHub workflow can load it by file path, without importing
``earthmind_compat`` (and TerraTorch) first::

    python earthmind_compat/matrix.py render --check
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = 1
CELLS_FILE = Path("matrices/cells.toml")
RESULTS_DIR = Path("matrices/results")
BADGES_DIR = Path("matrices/badges")
TABLE_FILE = Path("matrices/table.md")
HEATMAP_FILE = Path("matrices/heatmap.png")
README_FILE = Path("README.md")
START_MARKER = "<!-- compat-table:start -->"
END_MARKER = "<!-- compat-table:end -->"

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
AXES = ("python", "torch", "torchvision", "terratorch", "transformers")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
STATUSES = ("pass", "fail")
ROW_STATUSES = ("pass", "fail", "skip")

COLORS = {
    "pass": "#4c1",
    "warn": "#dfb317",
    "fail": "#e05d44",
    "grey": "#9f9f9f",
}
SHIELDS_COLORS = {"pass": "brightgreen", "warn": "yellow", "fail": "red", "grey": "lightgrey"}


class MatrixError(Exception):
    """A cells file or a result file is missing, malformed or inconsistent."""


# ---------------------------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One cell of the matrix, as declared in ``matrices/cells.toml``.

    Attributes:
        id: Unique id; names the nox session parameter, the result file and the badges.
        python: Interpreter version ``"X.Y"``.
        torch: Exact torch version.
        torchvision: Exact torchvision version.
        terratorch: Exact TerraTorch version.
        transformers: Exact transformers version.
        pins: Extra requirement strings installed with the cell.
        axis: What the cell is there to show.
        excluded: Why the cell is not run, or ``None`` when it is run.
    """

    id: str
    python: str
    torch: str
    torchvision: str
    terratorch: str
    transformers: str
    pins: tuple[str, ...] = ()
    axis: str = ""
    excluded: str | None = None

    @property
    def active(self) -> bool:
        """Whether the cell is run (not excluded)."""
        return self.excluded is None

    def requirements(self) -> list[str]:
        """The ``==`` pins of the cell followed by its extra pins."""
        return [
            f"torch=={self.torch}",
            f"torchvision=={self.torchvision}",
            f"terratorch=={self.terratorch}",
            f"transformers=={self.transformers}",
            *self.pins,
        ]


def load_cells(path: str | Path = CELLS_FILE) -> list[Cell]:
    """Read and validate the cells file.

    Args:
        path: The TOML file with ``[[cell]]`` tables.

    Returns:
        The cells in file order.

    Raises:
        MatrixError: If the file is missing, not TOML, or a cell is malformed or duplicated.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise MatrixError(f"{path}: cannot read cells: {exc}") from exc
    if data.get("schema") != SCHEMA:
        raise MatrixError(f"{path}: expected schema = {SCHEMA}, found {data.get('schema')!r}")
    raw_cells = data.get("cell")
    if not isinstance(raw_cells, list) or not raw_cells:
        raise MatrixError(f"{path}: no [[cell]] tables")
    cells: list[Cell] = []
    seen: set[str] = set()
    known = {"id", "python", "torch", "torchvision", "terratorch", "transformers", "pins", "axis", "excluded"}
    for index, raw in enumerate(raw_cells):
        where = f"{path}: cell #{index + 1}"
        unknown = sorted(set(raw) - known)
        if unknown:
            raise MatrixError(f"{where}: unknown keys {unknown}")
        for key in ("id", *AXES):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise MatrixError(f"{where}: '{key}' must be a non-empty string")
        if not _ID_RE.match(raw["id"]):
            raise MatrixError(f"{where}: id {raw['id']!r} may only use letters, digits, '.', '_' and '-'")
        if raw["id"] in seen:
            raise MatrixError(f"{where}: duplicate id {raw['id']!r}")
        seen.add(raw["id"])
        if not re.fullmatch(r"3\.\d+", raw["python"]):
            raise MatrixError(f"{where}: python must look like '3.11', found {raw['python']!r}")
        pins = raw.get("pins", [])
        if not isinstance(pins, list) or not all(isinstance(p, str) for p in pins):
            raise MatrixError(f"{where}: 'pins' must be a list of strings")
        excluded = raw.get("excluded")
        if excluded is not None and (not isinstance(excluded, str) or not excluded.strip()):
            raise MatrixError(f"{where}: 'excluded' must be a non-empty reason")
        cells.append(
            Cell(
                id=raw["id"],
                python=raw["python"],
                torch=raw["torch"],
                torchvision=raw["torchvision"],
                terratorch=raw["terratorch"],
                transformers=raw["transformers"],
                pins=tuple(pins),
                axis=str(raw.get("axis", "")),
                excluded=excluded,
            )
        )
    return cells


def active_cells(cells: Iterable[Cell]) -> list[Cell]:
    """The cells that are run, in file order."""
    return [cell for cell in cells if cell.active]


def github_matrix(nox_listing: Sequence[Mapping[str, Any]], session: str = "compat") -> dict[str, list[dict[str, str]]]:
    """Turn ``nox -l --json`` output into a GitHub Actions ``strategy.matrix`` value.

    Args:
        nox_listing: The parsed JSON list that ``nox -l --json`` prints.
        session: The parametrized session to keep.

    Returns:
        ``{"include": [{"session": ..., "cell": ..., "python": ...}, ...]}`` in listing order.
    """
    include = []
    for entry in nox_listing:
        if entry.get("name") != session:
            continue
        call_spec = entry.get("call_spec") or {}
        include.append(
            {
                "session": str(entry["session"]),
                "cell": str(call_spec.get("cell", "")),
                "python": str(entry.get("python") or ""),
            }
        )
    return {"include": include}


# --------------------------------------------------------------------------------------------- results


def junit_layers(path: str | Path) -> tuple[dict[str, dict[str, float]], list[dict[str, str]]]:
    """Count pass / fail / skip per test layer from a pytest JUnit XML file.

    The layer of a test case is read from its ``layers`` property, which the pytest plugin
    ``matrices/pytest_layers.py`` records from the test's markers (first layer in :data:`LAYERS` order);
    a case without it counts as :data:`UNMARKED`.

    Args:
        path: The ``--junitxml`` file.

    Returns:
        ``(layers, failures)``: per-layer ``passed/failed/skipped/seconds``, and one entry per failed
        or errored test with its layer and the first line of its message, sorted by test id.

    Raises:
        MatrixError: If the file cannot be parsed.
    """
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise MatrixError(f"{path}: cannot read JUnit XML: {exc}") from exc
    layers: dict[str, dict[str, float]] = {}
    failures: list[dict[str, str]] = []
    for case in root.iter("testcase"):
        layer = UNMARKED
        for prop in case.iter("property"):
            if prop.get("name") == "layers" and prop.get("value"):
                layer = prop.get("value", UNMARKED).split(",")[0]
        counts = layers.setdefault(layer, {"passed": 0, "failed": 0, "skipped": 0, "seconds": 0.0})
        counts["seconds"] += float(case.get("time", "0") or 0)
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            counts["failed"] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            failures.append({"test": name, "layer": layer, "message": failure_message(bad)})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    for counts in layers.values():
        counts["seconds"] = round(counts["seconds"], 1)
        for key in ("passed", "failed", "skipped"):
            counts[key] = int(counts[key])
    failures.sort(key=lambda f: f["test"])
    return dict(sorted(layers.items(), key=lambda kv: _layer_order(kv[0]))), failures


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
        tests: ``{"exit_code", "detail", "layers", "failures"}`` from the pytest run, or ``None``.
        check: ``{"exit_code", "detail", ...}`` plus :func:`read_check` output, or ``None``.
        durations: Wall seconds per phase.
        source: What code was tested, e.g. ``{"commit": sha, "dirty": bool}`` (a run tests the work tree).

    Returns:
        The result document; ``status`` is ``"pass"`` only if install, every test and every check row
        passed (a pin outside the package's declared range is reported, not failed).
    """
    layers = dict((tests or {}).get("layers", {}))
    test_summary = {
        key: int(sum(int(c.get(key, 0)) for c in layers.values())) for key in ("passed", "failed", "skipped")
    }
    tests_doc = {
        "exit_code": (tests or {}).get("exit_code"),
        "detail": str((tests or {}).get("detail", "not run")),
        **test_summary,
        "layers": layers,
        "failures": list((tests or {}).get("failures", [])),
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
        "requested": {axis: getattr(cell, axis) for axis in AXES} | {"pins": list(cell.pins)},
        "versions": dict(sorted(versions.items())),
        "declared": {"ok": bool(declared.get("ok")), "detail": str(declared.get("detail", ""))},
        "install": {"ok": bool(install.get("ok")), "detail": str(install.get("detail", ""))},
        "tests": tests_doc,
        "check": check_doc,
        "durations": {k: round(float(v), 1) for k, v in sorted((durations or {}).items())},
        "source": dict(source or {}),
        "status": "pass" if ok else "fail",
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
            for key in ("passed", "failed", "skipped"):
                total = sum(c[key] for c in layers.values())
                if total != tests[key]:
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
    if not problems and data["status"] == "pass":
        if tests["failed"] or check["failed"] or not data["install"].get("ok"):
            problems.append("status is 'pass' but a test, a check row or the install failed")
        if not tests["passed"] or not check["passed"]:
            problems.append("status is 'pass' but no test or no check row passed")
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


# ------------------------------------------------------------------------------------------ rendering


@dataclass(frozen=True)
class Summary:
    """What a badge and a table row say about one cell."""

    message: str
    tone: str  # key of COLORS
    notes: list[str] = field(default_factory=list)


def summarize(cell: Cell, result: Mapping[str, Any] | None) -> Summary:
    """Badge message, colour and notes for one cell."""
    if not cell.active:
        return Summary("excluded", "grey", [f"excluded: {cell.excluded}"])
    if result is None:
        return Summary("not run", "grey", ["no result committed"])
    notes = []
    if not result["install"]["ok"]:
        notes.append(f"install failed: {result['install']['detail']}")
        return Summary("install failed", "fail", notes)
    if not result["declared"]["ok"]:
        notes.append(f"outside the package's declared requirements: {result['declared']['detail']}")
    tests, check = result["tests"], result["check"]
    passed = tests["passed"] + check["passed"]
    total = passed + tests["failed"] + check["failed"]
    if result["status"] == "pass":
        return Summary(f"{passed}/{total} passed", "warn" if notes else "pass", notes)
    if tests["exit_code"] not in (0, 1) and tests["exit_code"] is not None:
        notes.append(f"pytest exit code {tests['exit_code']}: {tests['detail']}")
    if check["exit_code"] not in (0, 1) and check["exit_code"] is not None:
        notes.append(f"check exit code {check['exit_code']}: {check['detail']}")
    return Summary(f"{passed}/{total} passed", "fail", notes)


def _fraction(counts: Mapping[str, int] | None) -> str:
    if not counts:
        return "-"
    run = counts["passed"] + counts["failed"]
    if run == 0:
        return f"skip {counts['skipped']}" if counts.get("skipped") else "-"
    mark = "✅" if counts["failed"] == 0 else "❌"
    return f"{mark} {counts['passed']}/{run}"


def _escape_md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(cells: Sequence[Cell], results: Mapping[str, Mapping[str, Any]]) -> str:
    """The Markdown put between the README markers.

    Args:
        cells: Cells in file order.
        results: Validated results by cell id.

    Returns:
        Markdown text ending in a newline.
    """
    layers = [layer for layer in LAYERS if any(layer in r["tests"]["layers"] for r in results.values())]
    if any(UNMARKED in r["tests"]["layers"] for r in results.values()):
        layers.append(UNMARKED)
    header = ["Cell", "Python", "torch", "TerraTorch", "transformers", *layers, "check", "status"]
    lines = [
        "<!-- generated by `earthmind-compat matrix render` from matrices/cells.toml and matrices/results/; "
        "do not edit -->",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    notes: list[tuple[str, str]] = []
    for cell in cells:
        result = results.get(cell.id)
        summary = summarize(cell, result)
        versions = (result or {}).get("versions", {})
        shown = [
            versions.get(axis) or getattr(cell, axis) for axis in ("python", "torch", "terratorch", "transformers")
        ]
        if result is None:
            row_layers = ["-"] * len(layers)
            check = "-"
        else:
            row_layers = [_fraction(result["tests"]["layers"].get(layer)) for layer in layers]
            check = _fraction(result["check"])
        badge = f"![{summary.message}](matrices/badges/{cell.id}.svg)"
        lines.append("| " + " | ".join([f"`{cell.id}`", *shown, *row_layers, check, badge]) + " |")
        notes.extend((cell.id, note) for note in summary.notes)
    lines.append("")
    lines.append(
        "Cells are defined in [`matrices/cells.toml`](matrices/cells.toml); re-run one with "
        "`nox -s \"compat(cell='<id>')\"`, then `nox -s render`. Columns are test layers (pytest markers, "
        "`passed/run`) and `earthmind-compat check` rows (backbone x feature)."
    )
    if notes:
        lines.append("")
        lines.append("Notes:")
        lines.append("")
        lines.extend(f"- `{cid}`: {_escape_md(note)}" for cid, note in notes)
    for cell in cells:
        result = results.get(cell.id) or {}
        failed_rows = [row for row in result.get("check", {}).get("rows", []) if row["status"] == "fail"]
        failures = result.get("tests", {}).get("failures", [])
        if not failed_rows and not failures:
            continue
        lines.append("")
        lines.append(
            f"<details><summary><code>{cell.id}</code>: {len(failures)} failed tests, "
            f"{len(failed_rows)} failed check rows</summary>"
        )
        lines.append("")
        lines.extend(
            f"- check `{row['backbone']}` x `{row['feature']}`: {_escape_md(row['detail'])}" for row in failed_rows
        )
        lines.extend(f"- `{item['test']}` ({item['layer']}): {_escape_md(item['message'])}" for item in failures)
        lines.append("")
        lines.append("</details>")
    return "\n".join(lines) + "\n"


def splice_readme(readme: str, table: str) -> str:
    """Replace the text between the compat-table markers.

    Args:
        readme: The README text.
        table: The generated Markdown.

    Returns:
        The new README text.

    Raises:
        MatrixError: If the markers are missing, repeated or out of order.
    """
    if readme.count(START_MARKER) != 1 or readme.count(END_MARKER) != 1:
        raise MatrixError(f"README needs exactly one {START_MARKER} and one {END_MARKER}")
    start = readme.index(START_MARKER) + len(START_MARKER)
    end = readme.index(END_MARKER)
    if end < start:
        raise MatrixError(f"{END_MARKER} comes before {START_MARKER} in README")
    return readme[:start] + "\n" + table + readme[end:]


# Approximate advance widths of Verdana 11 px (what shields.io badges use), in pixels.
_NARROW = set("ijl.,:;|!'`")
_SEMI = set("frtI()[]-/ ")
_WIDE = set("mwMW%@")


def text_width(text: str) -> int:
    """Approximate rendered width of ``text`` in 11 px Verdana."""
    width = 0.0
    for char in text:
        if char in _NARROW:
            width += 3.7
        elif char in _SEMI:
            width += 4.9
        elif char in _WIDE:
            width += 10.5
        elif char.isupper() or char.isdigit():
            width += 7.0
        else:
            width += 6.6
    return math.ceil(width)


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def badge_svg(label: str, message: str, color: str) -> str:
    """A flat, shields.io-style badge drawn from a fixed template.

    Args:
        label: Left-hand text.
        message: Right-hand text.
        color: Right-hand background, e.g. ``"#4c1"``.

    Returns:
        The SVG document (ends in a newline).
    """
    left = text_width(label) + 10
    right = text_width(message) + 10
    total = left + right
    title = _xml(f"{label}: {message}")
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="20" role="img" aria-label="{title}">'
        f"<title>{title}</title>"
        '<linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" stop-opacity=".1"/>'
        '<stop offset="1" stop-opacity=".1"/></linearGradient>'
        f'<clipPath id="r"><rect width="{total}" height="20" rx="3" fill="#fff"/></clipPath>'
        f'<g clip-path="url(#r)"><rect width="{left}" height="20" fill="#555"/>'
        f'<rect x="{left}" width="{right}" height="20" fill="{color}"/>'
        f'<rect width="{total}" height="20" fill="url(#s)"/></g>'
        '<g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" font-size="11">'
        f'<text x="{left / 2:g}" y="15" fill="#010101" fill-opacity=".3">{_xml(label)}</text>'
        f'<text x="{left / 2:g}" y="14">{_xml(label)}</text>'
        f'<text x="{left + right / 2:g}" y="15" fill="#010101" fill-opacity=".3">{_xml(message)}</text>'
        f'<text x="{left + right / 2:g}" y="14">{_xml(message)}</text></g></svg>\n'
    )


def endpoint_json(label: str, message: str, tone: str) -> str:
    """A shields.io endpoint document (``https://img.shields.io/endpoint?url=...``)."""
    return dumps({"schemaVersion": 1, "label": label, "message": message, "color": SHIELDS_COLORS[tone]})


def heatmap_matrix(
    cells: Sequence[Cell], results: Mapping[str, Mapping[str, Any]]
) -> tuple[list[str], list[str], list[list[float]]]:
    """The numbers behind the heatmap: rows are cells, columns test layers then check features.

    Values are the pass fraction (passed / run) of a layer or of a ``backbone/feature`` check row
    (1 pass, 0 fail, 0.5 skip); ``nan`` where a cell has no such entry (excluded, not run, absent).

    Returns:
        ``(row_labels, column_labels, values)``.
    """
    columns = [layer for layer in (*LAYERS, UNMARKED) if any(layer in r["tests"]["layers"] for r in results.values())]
    features = sorted({f"{row['backbone']}/{row['feature']}" for r in results.values() for row in r["check"]["rows"]})
    labels = [f"test:{c}" for c in columns] + [f"check:{f}" for f in features]
    values: list[list[float]] = []
    for cell in cells:
        result = results.get(cell.id)
        line: list[float] = []
        for layer in columns:
            counts = (result or {}).get("tests", {}).get("layers", {}).get(layer)
            run = counts["passed"] + counts["failed"] if counts else 0
            line.append(counts["passed"] / run if run else math.nan)
        rows = {f"{r['backbone']}/{r['feature']}": r["status"] for r in (result or {}).get("check", {}).get("rows", [])}
        line.extend({"pass": 1.0, "fail": 0.0, "skip": 0.5}.get(rows.get(f, ""), math.nan) for f in features)
        values.append(line)
    return [cell.id for cell in cells], labels, values


def render_heatmap(cells: Sequence[Cell], results: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Draw the cell x feature heatmap as PNG bytes (matplotlib, Agg, no metadata)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    rows, columns, values = heatmap_matrix(cells, results)
    # Anything short of 100 % stays in the red..yellow range, so a single failure is never drawn green.
    stops = [(0.0, "#e05d44"), (0.99, "#dfb317"), (1.0, "#44cc11")]
    cmap = LinearSegmentedColormap.from_list("compat", stops).with_extremes(bad="#d9d9d9")
    status = {cell.id: "excluded" if not cell.active else "" if cell.id in results else "not run" for cell in cells}
    with matplotlib.rc_context({"font.family": "DejaVu Sans", "font.size": 8, "svg.hashsalt": "earthmind"}):
        fig, ax = plt.subplots(figsize=(max(6.0, 0.42 * len(columns) + 4.5), 0.42 * len(rows) + 2.6), dpi=100)
        ax.imshow(values if columns else [[math.nan] for _ in rows], cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        for i, line in enumerate(values):
            for j, value in enumerate(line):
                if math.isnan(value):
                    text = status[rows[i]] or "n/a"
                else:
                    text = f"{value:.0%}" if 0 < value < 1 else ("ok" if value else "fail")
                ax.text(j, i, text, ha="center", va="center", fontsize=6)
        ax.set_title("earthmind-compat: cell x feature (pass fraction; grey = excluded / not run)")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", metadata={"Software": None})
        plt.close(fig)
    return buffer.getvalue()


def render_outputs(root: str | Path = ".") -> dict[Path, bytes]:
    """Everything :func:`render` writes, as ``{path relative to root: bytes}``, without writing.

    Args:
        root: The repository root.

    Returns:
        File contents keyed by relative path (README.md only if it exists and has the markers).

    Raises:
        MatrixError: On a broken cells file or result file, or README markers that are broken.
    """
    root = Path(root)
    cells = load_cells(root / CELLS_FILE)
    results = load_results(cells, root / RESULTS_DIR)
    table = render_table(cells, results)
    outputs: dict[Path, bytes] = {TABLE_FILE: table.encode()}
    readme = root / README_FILE
    if readme.exists():
        text = readme.read_text(encoding="utf-8")
        if START_MARKER in text or END_MARKER in text:
            outputs[README_FILE] = splice_readme(text, table).encode()
    for cell in cells:
        summary = summarize(cell, results.get(cell.id))
        color = COLORS[summary.tone]
        outputs[BADGES_DIR / f"{cell.id}.svg"] = badge_svg(cell.id, summary.message, color).encode()
        outputs[BADGES_DIR / f"{cell.id}.json"] = endpoint_json(cell.id, summary.message, summary.tone).encode()
    outputs[HEATMAP_FILE] = render_heatmap(cells, results)
    return outputs


def render(root: str | Path = ".", *, check: bool = False) -> list[Path]:
    """Write (or, with ``check``, compare) the README table, badges and heatmap.

    Args:
        root: The repository root.
        check: Do not write; report the files whose committed content differs.

    Returns:
        Paths (relative to ``root``) that were changed, or that would change with ``check``.
        Stale badges of cells no longer in the cells file are removed (or reported).
    """
    root = Path(root)
    outputs = render_outputs(root)
    changed = []
    for rel, content in sorted(outputs.items()):
        path = root / rel
        if path.exists() and path.read_bytes() == content:
            continue
        changed.append(rel)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    badges = root / BADGES_DIR
    for stale in sorted(badges.glob("*")) if badges.is_dir() else []:
        rel = stale.relative_to(root)
        if rel not in outputs and stale.suffix in (".svg", ".json"):
            changed.append(rel)
            if not check:
                stale.unlink()
    return changed


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``earthmind-compat matrix``."""
    parser = argparse.ArgumentParser(
        prog="earthmind-compat matrix", description="Compatibility matrix: validate results and render them."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    render_p = sub.add_parser("render", help="write the README table, badges and heatmap from matrices/results")
    render_p.add_argument("--root", default=".", help="repository root (default: current directory)")
    render_p.add_argument("--check", action="store_true", help="write nothing; exit 1 if an output is out of date")
    validate_p = sub.add_parser("validate", help="check matrices/cells.toml and every result file")
    validate_p.add_argument("--root", default=".", help="repository root (default: current directory)")
    cells_p = sub.add_parser("cells", help="print the active cell ids, one a line")
    cells_p.add_argument("--root", default=".", help="repository root (default: current directory)")
    gha_p = sub.add_parser("gha-matrix", help="turn `nox -l --json` (stdin) into a GitHub Actions matrix (stdout)")
    gha_p.add_argument("--session", default="compat", help="nox session name (default: compat)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``earthmind-compat matrix`` (and of ``python earthmind_compat/matrix.py``).

    Args:
        argv: Arguments after ``matrix``, e.g. ``["render", "--check"]`` (default: ``sys.argv[1:]``).

    Returns:
        0 on success; 1 if ``render --check`` found outputs out of date; 2 on a broken cells or result file.
    """
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "render":
            changed = render(args.root, check=args.check)
            verb = "out of date" if args.check else "written"
            for rel in changed:
                print(f"{verb}: {rel}")
            if not changed:
                print("matrix outputs are up to date")
            return 1 if (args.check and changed) else 0
        if args.command == "validate":
            cells = load_cells(Path(args.root) / CELLS_FILE)
            results = load_results(cells, Path(args.root) / RESULTS_DIR)
            print(f"{len(cells)} cells ({len(active_cells(cells))} active), {len(results)} valid result files")
            return 0
        if args.command == "cells":
            for cell in active_cells(load_cells(Path(args.root) / CELLS_FILE)):
                print(cell.id)
            return 0
        listing = json.load(sys.stdin)
        print(json.dumps(github_matrix(listing, args.session), sort_keys=True))
        return 0
    except MatrixError as exc:
        print(f"earthmind-compat matrix: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
