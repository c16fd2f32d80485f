"""Console-script entry of ``earthmind-compat``: ``--help`` and argument errors answer without TerraTorch.

Why this module lives outside the package: ``import earthmind_compat`` registers the backbones in
TerraTorch's registries, and so imports TerraTorch (about 12 s on a 2-core machine). That contract stays:
TerraTorch configs and ``custom_modules`` rely on a plain ``import earthmind_compat``. But Python runs a
package's ``__init__`` before any of its submodules, so a console script pointing into the package
(``earthmind_compat.cli:main``) paid those seconds before argparse could print ``--help`` or a one-line
usage error.

This launcher creates the ``earthmind_compat`` module object from its spec without executing it, imports
:mod:`earthmind_compat.cli` (which, with the command modules, imports only the standard library at import
time), and hands :func:`earthmind_compat.cli.main` a ``prepare`` callback that executes the package's
``__init__`` (registration included) once the arguments parsed, just before the command runs. From then
on the process is the same as after a plain ``import earthmind_compat``.

Alternatives not taken: registering lazily on first use would break ``import earthmind_compat`` as the way
to register; loading the command modules by file path under another name would execute them twice.
"""

from __future__ import annotations

import importlib.util
import sys

PACKAGE = "earthmind_compat"


def main() -> int:
    """Run ``earthmind-compat`` with ``sys.argv``, importing the package only if a command runs.

    Returns:
        The process exit code.
    """
    if PACKAGE in sys.modules:  # imported already (e.g. called from Python): nothing left to defer
        from earthmind_compat.cli import main as cli_main

        return cli_main()
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {PACKAGE!r}", name=PACKAGE)
    loader = spec.loader
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package  # its submodules import normally; its __init__ has not run yet

    def finish_import() -> None:
        """Run the package's ``__init__``: the deferred ``import earthmind_compat``."""
        try:
            loader.exec_module(package)
        except BaseException:
            del sys.modules[PACKAGE]  # as after a failed import: no half-initialised package left behind
            raise

    from earthmind_compat.cli import main as cli_main

    return cli_main(prepare=finish_import)


if __name__ == "__main__":
    sys.exit(main())
