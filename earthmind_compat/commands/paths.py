"""Output paths of the commands, checked while the arguments are parsed (before any heavy import or work).

A ``--json`` file or ``--output`` directory that cannot be written would otherwise end the command with a
traceback after minutes of work. These ``argparse`` types refuse it at once, as an argument error.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _check_creatable(path: Path, what: str) -> None:
    """Raise unless every missing directory on the way to ``path`` can be created."""
    existing = _nearest_existing(path.parent if what == "file" else path)
    if existing != path and not existing.is_dir():
        raise argparse.ArgumentTypeError(
            f"cannot write {what} {path}: {existing} is a file, not a directory; choose another path"
        )
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(
            f"cannot write {what} {path}: no permission to write in {existing}; choose a writable path"
        )


def writable_file(text: str) -> Path:
    """``argparse`` type of an output file: its directory must exist or be creatable, and writable.

    Raises:
        argparse.ArgumentTypeError: naming the path and what stands in the way.
    """
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a directory; give a file name, e.g. {path / 'results.json'}")
    _check_creatable(path, "file")
    return path


def writable_directory(text: str) -> Path:
    """``argparse`` type of an output directory: existing and writable, or creatable.

    Raises:
        argparse.ArgumentTypeError: naming the path and what stands in the way.
    """
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file; give a directory for the results")
    _check_creatable(path, "directory")
    return path
