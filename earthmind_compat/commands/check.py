"""``earthmind-compat check``: every backbone x feature at tiny size, as a table and JSON."""

from __future__ import annotations

import argparse
import sys

from earthmind_compat.commands.paths import writable_file

NAME = "check"
HELP = "certify this environment: every backbone x feature at tiny size"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``check``."""
    parser.add_argument("--json", metavar="PATH", type=writable_file, help="also write the results as JSON")
    parser.add_argument("--backbones", nargs="+", metavar="NAME", help="backbones to check (default: all)")
    parser.add_argument("--features", nargs="+", metavar="NAME", help="features to check (default: all)")


def run(args: argparse.Namespace) -> int:
    """Run the checks, print the table, write JSON if asked; exit code 1 if any check failed."""
    from tqdm import tqdm

    from earthmind_compat.builders import BACKBONE_BUILDERS
    from earthmind_compat.check import FEATURES, format_table, run_checks, validate_names, write_json

    backbones = args.backbones or list(BACKBONE_BUILDERS)
    features = args.features or list(FEATURES)
    validate_names(backbones, features)
    bar = tqdm(total=len(backbones) * len(features), desc="check", unit="check", file=sys.stderr, leave=False)

    def progress(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)

    rows = run_checks(backbones, features, progress=progress)
    bar.close()
    print(format_table(rows))
    failed = sum(r.status == "fail" for r in rows)
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    if args.json:
        print(f"JSON written to {write_json(rows, args.json)}")
    return 1 if failed else 0
