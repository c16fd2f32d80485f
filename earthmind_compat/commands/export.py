"""``earthmind-compat export-adapters``: what a fine-tune learned, from a Lightning checkpoint, without the base."""

from __future__ import annotations

import argparse
from pathlib import Path

from earthmind_compat.commands.paths import writable_file

NAME = "export-adapters"
HELP = (
    "write the adapters, new backbone layers, necks, decoder and head of a fine-tuned checkpoint to safetensors "
    "(load them back with earthmind_compat.optimize.load_adapters)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``export-adapters``."""
    parser.add_argument("-c", "--config", required=True, type=Path, help="the TerraTorch YAML the model was fit with")
    parser.add_argument("--ckpt_path", required=True, type=Path, help="Lightning checkpoint written by fit")
    parser.add_argument("--output", required=True, type=writable_file, help="output file, e.g. adapters.safetensors")


def run(args: argparse.Namespace) -> int:
    """Build the task from the config, load the checkpoint strictly, export; print what was written."""
    import torch  # deferred: see earthmind_compat.cli
    from terratorch.cli_tools import build_lightning_cli

    from earthmind_compat.errors import WeightsError
    from earthmind_compat.optimize import export_adapters

    for path, what in ((args.config, "config"), (args.ckpt_path, "checkpoint")):
        if not path.is_file():
            raise WeightsError(f"The {what} {path} does not exist.")
    cli = build_lightning_cli(["--config", str(args.config)], run=False)
    try:
        checkpoint = torch.load(args.ckpt_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise WeightsError(
            f"{args.ckpt_path} is not a readable Lightning checkpoint ({type(exc).__name__}); pass the .ckpt file "
            "that `fit` wrote."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise WeightsError(f"{args.ckpt_path} holds no 'state_dict'; pass the .ckpt file that `fit` wrote.")
    cli.model.load_state_dict(checkpoint["state_dict"], strict=True)
    export = export_adapters(cli.model, args.output)
    full = args.ckpt_path.stat().st_size
    print(
        f"wrote {export.tensors} tensors, {export.bytes / 2**20:.2f} MiB ({export.bytes / full:.1%} of the "
        f"{full / 2**20:.2f} MiB checkpoint), technique {export.technique}, to {export.path}"
    )
    return 0
