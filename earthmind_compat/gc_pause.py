"""Pause Python's garbage collector around a block of long-lived allocations.

Importing this package imports torch, transformers and TerraTorch, which build about a million objects that live
as long as the process. Each full collection during the import walks all of them again, finds nothing to free and
costs about 2 s of a 10 s import on a 2-core machine. The package's ``__init__`` therefore runs under
:func:`garbage_collection_paused`. The module imports only the standard library, so the package can use it before
anything heavy.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def garbage_collection_paused() -> Iterator[None]:
    """Disable automatic garbage collection inside the block, then restore the caller's setting.

    Collection resumes afterwards only if it was enabled before, also when the block raises: a caller that had
    disabled it keeps it disabled.

    Yields:
        Nothing; the block runs with automatic collection off.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
