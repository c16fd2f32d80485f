"""What is rendered from the cells and the committed results, byte for byte the same on every run.

- the table spliced into ``README.md`` between ``<!-- compat-table:start -->`` and
  ``<!-- compat-table:end -->`` (also written alone to ``matrices/table.md``),
- one SVG badge per cell (``matrices/badges/<cell>.svg``, drawn by anybadge, no network) and its
  shields.io endpoint JSON (``matrices/badges/<cell>.json``),
- a PNG heatmap of cell x feature (``matrices/heatmap.png``).

Everything rendered is a pure function of ``cells.toml`` and the result files: no timestamps, sorted
keys, fixed ordering, so regenerating from committed results is byte-identical. anybadge and matplotlib
are imported only when a badge or the heatmap is drawn.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.matrix.cells import CELLS_FILE, Cell, MatrixError, load_cells
from tools.matrix.results import LAYERS, RESULTS_DIR, UNMARKED, dumps, load_results

BADGES_DIR = Path("matrices/badges")
TABLE_FILE = Path("matrices/table.md")
HEATMAP_FILE = Path("matrices/heatmap.png")
README_FILE = Path("README.md")
#: The tested ranges, rendered into the package: what ``earthmind_compat.compat`` warns outside of.
TESTED_VERSIONS_FILE = Path("earthmind_compat/tested_versions.json")
#: Dependencies whose supported range the results prove (installed versions of cells that passed).
SUPPORT_PACKAGES = ("torch", "terratorch", "transformers", "peft", "bitsandbytes")
#: Result statuses that prove a version works (an upstream-only cell passed everything of ours).
PROVING_STATUSES = ("pass", "upstream")
START_MARKER = "<!-- compat-table:start -->"
END_MARKER = "<!-- compat-table:end -->"

#: Tones: ``upstream`` (blue) is a cell whose only failures are expected ones, documented upstream bugs
#: (``xfail(strict=True)``); ``fail`` (red) always means ours, or an upstream fix whose xfail is still there.
COLORS = {
    "pass": "#4c1",
    "warn": "#dfb317",
    "upstream": "#007ec6",
    "fail": "#e05d44",
    "grey": "#9f9f9f",
}
SHIELDS_COLORS = {"pass": "brightgreen", "warn": "yellow", "upstream": "blue", "fail": "red", "grey": "lightgrey"}
#: Heatmap colour of a test layer whose only failures are expected (upstream) ones.
UPSTREAM_COLOR = "#5fa8d3"


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
    if result["status"] == "upstream":
        xfailed = tests.get("xfailed", 0)
        notes.append(f"{xfailed} expected failures from documented upstream bugs (see below)")
        return Summary(f"{passed}/{total} passed, {xfailed} upstream xfail", "upstream", notes)
    if tests["exit_code"] not in (0, 1) and tests["exit_code"] is not None:
        notes.append(f"pytest exit code {tests['exit_code']}: {tests['detail']}")
    if check["exit_code"] not in (0, 1) and check["exit_code"] is not None:
        notes.append(f"check exit code {check['exit_code']}: {check['detail']}")
    return Summary(f"{passed}/{total} passed", "fail", notes)


def _version_key(version: str) -> tuple[int, ...]:
    """Sort key of a release string (local suffixes such as ``+cu130`` and pre-release tails ignored)."""
    release = re.match(r"\d+(?:\.\d+)*", version.split("+")[0])
    return tuple(int(part) for part in release.group(0).split(".")) if release else ()


def tested_ranges(cells: Sequence[Cell], results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """Lowest and highest installed version of each :data:`SUPPORT_PACKAGES` over the cells that passed.

    The versions are those the cells really installed (``versions`` of each result), and only results whose
    status is in :data:`PROVING_STATUSES` count. The cell ids say which cell proves each end.

    Returns:
        ``{package: {"low", "low_cell", "high", "high_cell"}}`` for every package some passing cell installed.
    """
    ranges: dict[str, dict[str, str]] = {}
    for cell in cells:
        result = results.get(cell.id)
        if result is None or result["status"] not in PROVING_STATUSES:
            continue
        for package in SUPPORT_PACKAGES:
            version = result["versions"].get(package, "")
            if not _version_key(version):
                continue
            version = version.split("+")[0]
            entry = ranges.setdefault(
                package, {"low": version, "low_cell": cell.id, "high": version, "high_cell": cell.id}
            )
            if _version_key(version) < _version_key(entry["low"]):
                entry.update(low=version, low_cell=cell.id)
            if _version_key(version) > _version_key(entry["high"]):
                entry.update(high=version, high_cell=cell.id)
    return {package: ranges[package] for package in SUPPORT_PACKAGES if package in ranges}


def render_support_table(ranges: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Markdown lines: per dependency, the minimum supported and newest tested version and the proving cells."""
    lines = [
        "Supported versions (derived from the results below: the installed versions of the cells that passed; "
        "`import earthmind_compat` warns `UntestedVersionWarning` outside them):",
        "",
        "| dependency | minimum supported | proved by | newest tested | proved by |",
        "|---|---|---|---|---|",
    ]
    for package, entry in ranges.items():
        lines.append(
            f"| {package} | {entry['low']} | `{entry['low_cell']}` | {entry['high']} | `{entry['high_cell']}` |"
        )
    return [*lines, ""]


def _fraction(counts: Mapping[str, int] | None) -> str:
    if not counts:
        return "-"
    run = counts["passed"] + counts["failed"]
    if run == 0:
        return f"skip {counts['skipped']}" if counts.get("skipped") else "-"
    xfailed = counts.get("xfailed", 0)
    if counts["failed"]:
        return f"❌ {counts['passed']}/{run}"
    if xfailed:
        return f"🔷 {counts['passed']}/{run} +{xfailed} xfail"
    return f"✅ {counts['passed']}/{run}"


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
    header = [
        "Cell",
        "Python",
        "torch",
        "TerraTorch",
        "transformers",
        "peft",
        "bitsandbytes",
        *layers,
        "check",
        "status",
    ]
    lines = [
        "<!-- generated by `nox -s render` from matrices/cells.toml and matrices/results/; do not edit -->",
        "",
        *render_support_table(tested_ranges(cells, results)),
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    notes: list[tuple[str, str]] = []
    for cell in cells:
        result = results.get(cell.id)
        summary = summarize(cell, result)
        versions = (result or {}).get("versions", {})
        shown = [
            versions.get(axis) or getattr(cell, axis) or f"({cell.resolution})"
            for axis in ("python", "torch", "terratorch", "transformers", "peft", "bitsandbytes")
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
        "`passed/run`) and `earthmind-compat check` rows (backbone x feature). 🔷 / blue: nothing of ours "
        "failed, the expected failures are documented upstream bugs (`xfail(strict=True)`, listed per cell and in "
        "the troubleshooting section); ❌ / red: something failed, including an upstream fix whose xfail marker "
        "is still in place."
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
        expected = result.get("tests", {}).get("expected", [])
        if expected:
            lines.append("")
            lines.append(
                f"<details><summary><code>{cell.id}</code>: {len(expected)} expected failures (upstream)</summary>"
            )
            lines.append("")
            lines.extend(f"- `{item['test']}`: {_escape_md(item['reason'])}" for item in expected)
            lines.append("")
            lines.append("</details>")
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


def badge_svg(label: str, message: str, color: str) -> str:
    """A flat badge, drawn by anybadge.

    Args:
        label: Left-hand text.
        message: Right-hand text.
        color: Right-hand background, e.g. ``"#4c1"``.

    Returns:
        The SVG document (ends in a newline).
    """
    import anybadge

    badge = anybadge.Badge(label, message, default_color=color)
    # anybadge numbers each badge's mask from a per-process counter (for several badges in one page);
    # each badge here is a file of its own, so a fixed id keeps the output the same however many are drawn.
    badge.mask_str = "anybadge_1"
    return badge.badge_svg_text.rstrip("\n") + "\n"


def endpoint_json(label: str, message: str, tone: str) -> str:
    """A shields.io endpoint document (``https://img.shields.io/endpoint?url=...``)."""
    return dumps({"schemaVersion": 1, "label": label, "message": message, "color": SHIELDS_COLORS[tone]})


#: Heatmap value of a layer whose only failures are expected ones (outside the 0..1 pass fractions).
UPSTREAM_VALUE = 2.0


def heatmap_matrix(
    cells: Sequence[Cell], results: Mapping[str, Mapping[str, Any]]
) -> tuple[list[str], list[str], list[list[float]]]:
    """The numbers behind the heatmap: rows are cells, columns test layers then check features.

    Values are the pass fraction (passed / run) of a layer or of a ``backbone/feature`` check row
    (1 pass, 0 fail, 0.5 skip); ``nan`` where a cell has no such entry (excluded, not run, absent). A layer
    with no failure but expected (upstream) failures is :data:`UPSTREAM_VALUE`.

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
            if counts and not counts["failed"] and counts.get("xfailed", 0):
                line.append(UPSTREAM_VALUE)
            else:
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
    from matplotlib.colors import LinearSegmentedColormap, ListedColormap

    rows, columns, values = heatmap_matrix(cells, results)
    upstream = [[1.0 if value == UPSTREAM_VALUE else math.nan for value in line] for line in values]
    values = [[math.nan if value == UPSTREAM_VALUE else value for value in line] for line in values]
    # Anything short of 100 % stays in the red..yellow range, so a single failure is never drawn green.
    stops = [(0.0, "#e05d44"), (0.99, "#dfb317"), (1.0, "#44cc11")]
    cmap = LinearSegmentedColormap.from_list("compat", stops).with_extremes(bad="#d9d9d9")
    status = {cell.id: "excluded" if not cell.active else "" if cell.id in results else "not run" for cell in cells}
    with matplotlib.rc_context({"font.family": "DejaVu Sans", "font.size": 8, "svg.hashsalt": "earthmind"}):
        fig, ax = plt.subplots(figsize=(max(6.0, 0.42 * len(columns) + 4.5), 0.42 * len(rows) + 2.6), dpi=100)
        ax.imshow(values if columns else [[math.nan] for _ in rows], cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        if columns:  # expected (upstream) failures only: blue, drawn over the grey of the masked values
            blue = ListedColormap([UPSTREAM_COLOR]).with_extremes(bad=(0, 0, 0, 0))
            ax.imshow(upstream, cmap=blue, vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        for i, line in enumerate(values):
            for j, value in enumerate(line):
                if not math.isnan(upstream[i][j]):
                    text = "xfail"
                elif math.isnan(value):
                    text = status[rows[i]] or "n/a"
                else:
                    text = f"{value:.0%}" if 0 < value < 1 else ("ok" if value else "fail")
                ax.text(j, i, text, ha="center", va="center", fontsize=6)
        ax.set_title(
            "earthmind-compat: cell x feature (pass fraction; blue xfail = upstream bug; grey = excluded / not run)"
        )
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
    outputs[TESTED_VERSIONS_FILE] = dumps(
        {
            "generated_by": "nox -s render (tools.matrix) from matrices/results; do not edit",
            "ranges": tested_ranges(cells, results),
        }
    ).encode()
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
