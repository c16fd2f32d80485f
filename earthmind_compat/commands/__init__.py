"""Subcommands of the ``earthmind-compat`` CLI, one module each.

Each module defines ``NAME`` (the subcommand), ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. :mod:`earthmind_compat.cli` lists the modules in ``COMMAND_MODULES`` (adding a
command is one line there).

``earthmind-compat --help`` imports every module here, so at module level and in ``add_arguments`` a
command imports only the standard library, :mod:`earthmind_compat.errors` and
:mod:`earthmind_compat.sizes`; everything heavy (torch, TerraTorch, transformers, bitsandbytes, peft,
matplotlib, and the package modules that import them) is imported inside ``run``. ``tests/test_cli.py``
checks this for every command.
"""
