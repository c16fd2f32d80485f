"""Benchmark results as a terminal table, a JSON document and a PNG chart."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from earthmind_compat.bench.measure import Measurement
from earthmind_compat.compat import installed_versions


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def format_table(results: Sequence[Measurement]) -> str:
    """Plain-text table: one row per backbone x technique x mode."""
    header = ("backbone", "technique", "mode", "ms/call", "img/s", "weights MiB", "activations MiB", "cuda peak MiB")
    rows = [
        (
            r.backbone,
            r.technique,
            r.mode,
            f"{r.median_seconds * 1000:.1f}",
            f"{r.images_per_second:.1f}",
            _mib(r.weight_bytes),
            _mib(r.activation_bytes) if r.mode == "train" else "-",
            _mib(r.cuda_peak_bytes),
        )
        for r in results
    ]
    return align_columns(header, rows)


def align_columns(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table with every column as wide as its widest cell, a dashed rule under the header."""
    widths = [max(len(str(line[i])) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def write_json(results: Sequence[Measurement], path: Path, extra: dict | None = None) -> Path:
    """Write the results, the installed versions and ``extra`` as JSON."""
    document = {"versions": installed_versions(), "results": [r.as_dict() for r in results], **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return path


def write_chart(results: Sequence[Measurement], path: Path, title: str) -> Path:
    """A PNG with two panels per mode: time per call and memory (weights + saved activations).

    Args:
        results: Measurements to draw (grouped by backbone, one bar per technique).
        path: Output PNG path.
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("forward", "train") if any(r.mode == m for r in results)]
    backbones = list(dict.fromkeys(r.backbone for r in results))
    techniques = list(dict.fromkeys(r.technique for r in results))
    figure, axes = plt.subplots(len(modes), 2, figsize=(12, 3.6 * len(modes)), squeeze=False)
    width = 0.8 / max(len(techniques), 1)
    colours = plt.get_cmap("tab10")
    for row, mode in enumerate(modes):
        by_key = {(r.backbone, r.technique): r for r in results if r.mode == mode}
        for index, technique in enumerate(techniques):
            xs = [b + (index - (len(techniques) - 1) / 2) * width for b in range(len(backbones))]
            found = [by_key.get((backbone, technique)) for backbone in backbones]
            times = [r.median_seconds * 1000 if r else 0 for r in found]
            memory = [(r.weight_bytes + r.activation_bytes) / 2**20 if r else 0 for r in found]
            axes[row][0].bar(xs, times, width, label=technique, color=colours(index))
            axes[row][1].bar(xs, memory, width, label=technique, color=colours(index))
        axes[row][0].set_ylabel(f"{mode}: ms per call")
        axes[row][1].set_ylabel(f"{mode}: MiB (weights + activations)")
        for axis in axes[row]:
            axis.set_xticks(range(len(backbones)), backbones)
    axes[0][1].legend(title="technique", fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
