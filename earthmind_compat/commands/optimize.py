"""``earthmind-compat optimize``: what each memory technique costs and saves on one backbone."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from earthmind_compat.commands.paths import writable_directory

NAME = "optimize"
HELP = "accuracy, memory and speed of each technique on one backbone (table, JSON, PNG)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``optimize``."""
    parser.add_argument("--backbone", required=True, help="registered backbone name")
    parser.add_argument(
        "--test", nargs="+", default=["all"], metavar="T", help="technique strings, or 'all' (the benchmark sweep)"
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--output", default="optimize-results", type=writable_directory, help="directory for optimize.json/.png"
    )


def fidelity(backbone: str, technique: str, preset: str, device: str) -> dict:
    """Per-block agreement of ``technique`` with full precision on the same weights and input.

    Returns:
        ``{"worst_block_cosine": c, "mean_block_rel_error": e}`` from
        :func:`earthmind_compat.optimize.numerics.block_errors`.
    """
    import torch
    from terratorch.registry import BACKBONE_REGISTRY

    from earthmind_compat import optimize
    from earthmind_compat.bench.measure import benchmark_input, quiet_bitsandbytes
    from earthmind_compat.optimize.numerics import block_errors

    quiet_bitsandbytes()
    torch.manual_seed(0)
    reference = BACKBONE_REGISTRY.build(backbone, preset=preset).to(device).eval()
    candidate = copy.deepcopy(reference)
    optimize.apply(candidate, technique)
    candidate = candidate.to(device).eval()
    errors = block_errors(reference, candidate, benchmark_input(reference, backbone, preset, 2, device))
    return {
        "worst_block_cosine": min(e.cosine for e in errors),
        "mean_block_rel_error": sum(e.rel_error for e in errors) / len(errors),
    }


def run(args: argparse.Namespace) -> int:
    """Measure every requested technique; print the table with fidelity; write JSON and PNG."""
    from earthmind_compat.bench import BENCHMARK_TECHNIQUES
    from earthmind_compat.bench.report import align_columns, format_table, write_chart, write_json
    from earthmind_compat.builders import BACKBONE_BUILDERS
    from earthmind_compat.commands.benchmark import resolve_device, sweep
    from earthmind_compat.errors import unknown_name
    from earthmind_compat.optimize import parse_technique

    if args.backbone not in BACKBONE_BUILDERS:
        raise unknown_name("backbone", args.backbone, BACKBONE_BUILDERS)
    techniques = list(BENCHMARK_TECHNIQUES) if args.test == ["all"] else args.test
    for technique in techniques:
        parse_technique(technique)
    device = resolve_device(args.device)
    results, errors = sweep(
        [args.backbone], techniques, ["forward", "train"], args.preset, device, args.batch_size, args.rounds, "optimize"
    )
    quality = {}
    for technique in techniques:
        try:
            quality[parse_technique(technique).name] = fidelity(args.backbone, technique, args.preset, device)
        except Exception as exc:  # reported, not hidden
            errors.append({"backbone": args.backbone, "technique": technique, "mode": "fidelity", "error": f"{exc}"})
    print(format_table(results))
    fidelity_rows = [
        (name, f"{q['worst_block_cosine']:.5f}", f"{q['mean_block_rel_error']:.5f}") for name, q in quality.items()
    ]
    print("\n" + align_columns(("technique", "worst block cosine", "mean block rel. error"), fidelity_rows))
    for error in errors:
        print(f"FAILED {error['technique']} {error['mode']}: {error['error']}", file=sys.stderr)
    output = Path(args.output)
    json_path = write_json(results, output / "optimize.json", {"fidelity": quality, "errors": errors})
    png_path = write_chart(results, output / "optimize.png", f"{args.backbone}: techniques ({args.preset}, {device})")
    print(f"\nJSON: {json_path}\nPNG:  {png_path}")
    return 1 if errors else 0
