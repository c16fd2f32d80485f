"""``earthmind-compat benchmark``: speed and memory per backbone x technique, as table, JSON and PNG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from earthmind_compat.commands.paths import writable_directory

NAME = "benchmark"
HELP = "time and memory of each backbone x technique (table, JSON, PNG chart)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``benchmark``."""
    parser.add_argument("--backbones", nargs="+", metavar="NAME", help="backbones (default: all)")
    parser.add_argument(
        "--techniques", nargs="+", metavar="T", help="technique strings (default: the benchmark sweep, none .. qlora)"
    )
    parser.add_argument("--modes", nargs="+", choices=("forward", "train"), default=["forward", "train"])
    parser.add_argument("--preset", default="tiny", help="backbone preset (default: tiny)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per cell (median is reported)")
    parser.add_argument(
        "--output", default="benchmark-results", type=writable_directory, help="directory for benchmark.json/.png"
    )


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; refuse ``cuda`` without CUDA."""
    import torch

    from earthmind_compat.errors import ConfigurationError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigurationError("--device cuda was asked for but CUDA is not available here; use --device cpu.")
    return device


def sweep(backbones, techniques, modes, preset, device, batch, rounds, desc):
    """Measure every combination with a progress bar; return ``(results, errors)``."""
    from tqdm import tqdm

    from earthmind_compat.bench import measure

    cells = [(b, t, m) for b in backbones for t in techniques for m in modes]
    results, errors = [], []
    for backbone, technique, mode in tqdm(cells, desc=desc, unit="cell", file=sys.stderr):
        try:
            results.append(measure(backbone, technique, mode, preset, device, batch, rounds))
        except Exception as exc:  # one broken cell must not hide the others
            errors.append({"backbone": backbone, "technique": technique, "mode": mode, "error": f"{exc}"})
    return results, errors


def run(args: argparse.Namespace) -> int:
    """Run the sweep, print the table, write JSON and PNG; exit code 1 if a cell failed."""
    from earthmind_compat.bench import BENCHMARK_TECHNIQUES
    from earthmind_compat.bench.report import format_table, write_chart, write_json
    from earthmind_compat.builders import BACKBONE_BUILDERS
    from earthmind_compat.errors import unknown_name
    from earthmind_compat.optimize import parse_technique

    backbones = args.backbones or list(BACKBONE_BUILDERS)
    for name in backbones:
        if name not in BACKBONE_BUILDERS:
            raise unknown_name("backbone", name, BACKBONE_BUILDERS)
    techniques = args.techniques or list(BENCHMARK_TECHNIQUES)
    for technique in techniques:
        parse_technique(technique)
    device = resolve_device(args.device)
    results, errors = sweep(
        backbones, techniques, args.modes, args.preset, device, args.batch_size, args.rounds, "benchmark"
    )
    print(format_table(results))
    for error in errors:
        print(f"FAILED {error['backbone']} {error['technique']} {error['mode']}: {error['error']}")
    output = Path(args.output)
    json_path = write_json(results, output / "benchmark.json", {"errors": errors})
    png_path = write_chart(results, output / "benchmark.png", f"earthmind-compat benchmark ({args.preset}, {device})")
    print(f"\nJSON: {json_path}\nPNG:  {png_path}")
    return 1 if errors else 0
