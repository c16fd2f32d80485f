"""The ``earthmind-compat`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from earthmind_compat.errors import EarthMindCompatError

TERRATORCH_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _cmd_check(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from earthmind_compat.backbones import BACKBONE_BUILDERS
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


def _cmd_synthetic_data(args: argparse.Namespace) -> int:
    from earthmind_compat.synthetic import write_segmentation_dataset

    root = write_segmentation_dataset(args.directory, size=args.size, seed=args.seed)
    print(f"Synthetic GeoTIFF dataset written to {root}/{{train,val,test,predict}}")
    return 0


def _run_terratorch(subcommand: str, rest: Sequence[str]) -> int:
    """``earthmind-compat fit ...``: TerraTorch's own CLI, after our backbones are registered."""
    from terratorch.cli_tools import build_lightning_cli

    import earthmind_compat  # noqa: F401  (registers the backbones)

    build_lightning_cli([subcommand, *rest])
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``earthmind-compat`` command."""
    parser = argparse.ArgumentParser(
        prog="earthmind-compat",
        description="EarthMind, InternVL2.5-4B and Granite 4.0 Tiny as TerraTorch backbones.",
        epilog="fit/validate/test/predict run TerraTorch's CLI with these backbones registered, "
        "e.g. `earthmind-compat fit -c config.yaml`.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="certify this environment: every backbone x feature at tiny size")
    check.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    check.add_argument("--backbones", nargs="+", metavar="NAME", help="backbones to check (default: all)")
    check.add_argument("--features", nargs="+", metavar="NAME", help="features to check (default: all)")
    check.set_defaults(handler=_cmd_check)
    data = sub.add_parser("synthetic-data", help="write a small synthetic GeoTIFF segmentation dataset")
    data.add_argument("directory", help="output directory")
    data.add_argument("--size", type=int, default=56, help="scene side in pixels (default 56)")
    data.add_argument("--seed", type=int, default=0)
    data.set_defaults(handler=_cmd_synthetic_data)
    for name in TERRATORCH_SUBCOMMANDS:
        sub.add_parser(name, help=f"terratorch {name} with earthmind-compat backbones registered", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``earthmind-compat`` console script.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The process exit code.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TERRATORCH_SUBCOMMANDS:
        return _run_terratorch(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except EarthMindCompatError as exc:
        print(f"earthmind-compat: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
