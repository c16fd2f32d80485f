"""The compatibility matrix tooling: cells, per-cell results, and what is rendered from them.

Repository tooling, not shipped in the wheel. Run it from the repository root::

    python -m tools.matrix render            # README table, badges, heatmap (`nox -s render` pins matplotlib)
    python -m tools.matrix render --check    # exit 1 if a committed output is stale
    python -m tools.matrix validate          # check matrices/cells.toml and every result file
    python -m tools.matrix cells             # the active cell ids
    nox -l --json -s compat | python -m tools.matrix gha-matrix   # the GitHub Actions matrix

Modules, each with one job: :mod:`~tools.matrix.cells` (``matrices/cells.toml``),
:mod:`~tools.matrix.results` (``matrices/results/<cell>.json``: assembled, validated, loaded),
:mod:`~tools.matrix.rendering` (table, badges, heatmap) and :mod:`~tools.matrix.cli`. They import only the
standard library at import time (anybadge and matplotlib when drawing), so the noxfile can list sessions
without torch or TerraTorch installed.
"""

from __future__ import annotations

from tools.matrix.cells import AXES, CELLS_FILE, SCHEMA, Cell, MatrixError, active_cells, github_matrix, load_cells
from tools.matrix.cli import build_parser, main
from tools.matrix.rendering import (
    BADGES_DIR,
    COLORS,
    END_MARKER,
    HEATMAP_FILE,
    README_FILE,
    SHIELDS_COLORS,
    START_MARKER,
    SUPPORT_PACKAGES,
    TABLE_FILE,
    TESTED_VERSIONS_FILE,
    Summary,
    badge_svg,
    endpoint_json,
    heatmap_matrix,
    render,
    render_heatmap,
    render_outputs,
    render_table,
    splice_readme,
    summarize,
    tested_ranges,
)
from tools.matrix.results import (
    COUNTS,
    EXPECTED_COUNTS,
    LAYERS,
    RESULTS_DIR,
    ROW_STATUSES,
    STATUSES,
    UNMARKED,
    VERSION_PACKAGES,
    build_result,
    dumps,
    failure_message,
    junit_expected,
    junit_layers,
    load_results,
    read_check,
    validate_result,
)

__all__ = [
    "AXES",
    "BADGES_DIR",
    "CELLS_FILE",
    "COLORS",
    "COUNTS",
    "END_MARKER",
    "EXPECTED_COUNTS",
    "HEATMAP_FILE",
    "LAYERS",
    "README_FILE",
    "RESULTS_DIR",
    "ROW_STATUSES",
    "SCHEMA",
    "SHIELDS_COLORS",
    "START_MARKER",
    "STATUSES",
    "SUPPORT_PACKAGES",
    "TABLE_FILE",
    "TESTED_VERSIONS_FILE",
    "UNMARKED",
    "VERSION_PACKAGES",
    "Cell",
    "MatrixError",
    "Summary",
    "active_cells",
    "badge_svg",
    "build_parser",
    "build_result",
    "dumps",
    "endpoint_json",
    "failure_message",
    "github_matrix",
    "heatmap_matrix",
    "junit_expected",
    "junit_layers",
    "load_cells",
    "load_results",
    "main",
    "read_check",
    "render",
    "render_heatmap",
    "render_outputs",
    "render_table",
    "splice_readme",
    "summarize",
    "tested_ranges",
    "validate_result",
]
