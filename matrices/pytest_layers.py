"""pytest plugin for the compat matrix: record each test's layer in the JUnit XML.

Loaded by ``nox -s compat`` with ``-p pytest_layers`` (``matrices/`` on ``PYTHONPATH``). Each test gets
a ``layers`` property listing the layer markers it carries (registry, shapes, numerics, benchmark, e2e,
reliability, gpu), in that order; ``tools.matrix.results.junit_layers`` counts a test under the
first one. Tests are not changed in any other way.
"""

from __future__ import annotations

import pytest

LAYERS = ("registry", "shapes", "numerics", "benchmark", "e2e", "reliability", "gpu")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Attach the ``layers`` user property (written by ``--junitxml``) to every collected test."""
    for item in items:
        names = {mark.name for mark in item.iter_markers()}
        layers = [layer for layer in LAYERS if layer in names]
        if layers:
            item.user_properties.append(("layers", ",".join(layers)))
