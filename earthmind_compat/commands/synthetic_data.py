"""``earthmind-compat synthetic-data``: write a small synthetic GeoTIFF segmentation dataset."""

from __future__ import annotations

import argparse

from earthmind_compat.commands.paths import writable_directory

NAME = "synthetic-data"
HELP = "write a small synthetic GeoTIFF segmentation dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``synthetic-data``."""
    parser.add_argument("directory", type=writable_directory, help="output directory")
    parser.add_argument("--size", type=int, default=56, help="scene side in pixels (default 56)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """Write the dataset and say where."""
    from earthmind_compat.synthetic import write_segmentation_dataset

    root = write_segmentation_dataset(args.directory, size=args.size, seed=args.seed)
    print(f"Synthetic GeoTIFF dataset written to {root}/{{train,val,test,predict}}")
    return 0
