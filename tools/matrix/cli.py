"""``python -m tools.matrix``: validate the cells and results, render, and feed the GitHub workflow."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tools.matrix.cells import CELLS_FILE, RESOLUTIONS, MatrixError, active_cells, github_matrix, load_cells
from tools.matrix.rendering import render
from tools.matrix.results import RESULTS_DIR, load_results


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``python -m tools.matrix``."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.matrix", description="Compatibility matrix: validate results and render them."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    render_p = sub.add_parser("render", help="write the README table, badges and heatmap from matrices/results")
    render_p.add_argument("--root", default=".", help="repository root (default: current directory)")
    render_p.add_argument("--check", action="store_true", help="write nothing; exit 1 if an output is out of date")
    validate_p = sub.add_parser("validate", help="check matrices/cells.toml and every result file")
    validate_p.add_argument("--root", default=".", help="repository root (default: current directory)")
    cells_p = sub.add_parser("cells", help="print the active cell ids, one a line")
    cells_p.add_argument("--root", default=".", help="repository root (default: current directory)")
    cells_p.add_argument(
        "--resolution", choices=RESOLUTIONS, help="only the cells resolved this way (e.g. highest: the latest cell)"
    )
    gha_p = sub.add_parser("gha-matrix", help="turn `nox -l --json` (stdin) into a GitHub Actions matrix (stdout)")
    gha_p.add_argument("--session", default="compat", help="nox session name (default: compat)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tools.matrix`` (run from the repository root).

    Args:
        argv: Arguments, e.g. ``["render", "--check"]`` (default: ``sys.argv[1:]``).

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
                if args.resolution in (None, cell.resolution):
                    print(cell.id)
            return 0
        listing = json.load(sys.stdin)
        print(json.dumps(github_matrix(listing, args.session), sort_keys=True))
        return 0
    except MatrixError as exc:
        print(f"python -m tools.matrix: error: {exc}", file=sys.stderr)
        return 2
