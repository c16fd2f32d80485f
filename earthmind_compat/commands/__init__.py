"""Subcommands of the ``earthmind-compat`` CLI, one module each.

Each module defines ``NAME`` (the subcommand), ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. :mod:`earthmind_compat.cli` lists the modules in ``COMMAND_MODULES``.
"""
