"""The ``earthmind-compat`` command line: one subcommand per module of :mod:`earthmind_compat.commands`.

Start-up time: building the parser imports every command module, so this module and each command module
import only the standard library (and :mod:`earthmind_compat.errors` / :mod:`earthmind_compat.sizes`) at
import time; TerraTorch, torch and the rest are imported inside the ``run`` of the command that runs.
The console script enters through :mod:`earthmind_compat_launcher`, which defers the package's own
``__init__`` (it imports TerraTorch to register the backbones) until :func:`main` calls ``prepare``, after
the arguments parsed. ``tests/test_cli.py`` checks that ``--help`` and argument errors import no torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from earthmind_compat.errors import EarthMindCompatError

#: Subcommand modules, in the order ``--help`` lists them. Adding a command is one line here.
COMMAND_MODULES = [
    "earthmind_compat.commands.check",
    "earthmind_compat.commands.plan",
    "earthmind_compat.commands.synthetic_data",
    "earthmind_compat.commands.benchmark",
    "earthmind_compat.commands.optimize",
    "earthmind_compat.commands.export",
]

#: Subcommands handed to TerraTorch's own CLI after our backbones are registered.
TERRATORCH_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _run_terratorch(subcommand: str, rest: Sequence[str]) -> int:
    """``earthmind-compat fit ...``: TerraTorch's own CLI, after our backbones are registered."""
    from terratorch.cli_tools import build_lightning_cli  # deferred: TerraTorch takes seconds to import

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
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    for name in TERRATORCH_SUBCOMMANDS:
        sub.add_parser(name, help=f"terratorch {name} with earthmind-compat backbones registered", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None, *, prepare: Callable[[], object] | None = None) -> int:
    """Entry point of the ``earthmind-compat`` console script.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).
        prepare: Called once the arguments parsed, before the command runs. The console script
            (:mod:`earthmind_compat_launcher`) passes the deferred ``import earthmind_compat`` here, so that
            ``--help`` and argument errors never import TerraTorch.

    Returns:
        The process exit code.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TERRATORCH_SUBCOMMANDS:
        if prepare is not None:
            prepare()
        return _run_terratorch(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if prepare is not None:
            prepare()
        return args.handler(args)
    except EarthMindCompatError as exc:
        print(f"earthmind-compat: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
