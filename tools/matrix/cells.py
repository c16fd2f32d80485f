"""The cells of the compatibility matrix: ``matrices/cells.toml``, read and validated.

``matrices/cells.toml`` is the single source of truth for the cells (Python x torch x TerraTorch x
transformers): the noxfile parametrizes its ``compat`` session from them and the GitHub workflow takes
its matrix from ``nox -l --json`` through :func:`github_matrix`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Version of the cells file and of the result files.
SCHEMA = 1
CELLS_FILE = Path("matrices/cells.toml")
AXES = ("python", "torch", "torchvision", "terratorch", "transformers", "peft", "bitsandbytes")
#: Axes a ``pinned`` cell must name; peft and bitsandbytes are optional (the resolver picks them otherwise).
REQUIRED_AXES = ("python", "torch", "torchvision", "terratorch", "transformers")
#: How a cell's environment is resolved: ``pinned`` installs its exact versions; ``highest`` resolves the newest
#: releases that fit together at run time (the ``latest`` cell); ``lowest-direct`` installs every direct
#: dependency at the floor ``pyproject.toml`` declares (uv ``--resolution lowest-direct``).
RESOLUTIONS = ("pinned", "highest", "lowest-direct")
_VERSION_AXES = ("torch", "torchvision", "terratorch", "transformers", "peft", "bitsandbytes")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class MatrixError(Exception):
    """A cells file or a result file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class Cell:
    """One cell of the matrix, as declared in ``matrices/cells.toml``.

    Attributes:
        id: Unique id; names the nox session parameter, the result file and the badges.
        python: Interpreter version ``"X.Y"``.
        torch: Exact torch version.
        torchvision: Exact torchvision version.
        terratorch: Exact TerraTorch version.
        transformers: Exact transformers version.
        peft: Exact peft version, or ``None`` (resolved).
        bitsandbytes: Exact bitsandbytes version, or ``None`` (resolved).
        pins: Extra requirement strings installed with the cell.
        axis: What the cell is there to show.
        excluded: Why the cell is not run, or ``None`` when it is run.
        resolution: One of :data:`RESOLUTIONS`; the version axes of a non-``pinned`` cell are resolved at run time
            (the result records what was installed).
    """

    id: str
    python: str
    torch: str | None = None
    torchvision: str | None = None
    terratorch: str | None = None
    transformers: str | None = None
    peft: str | None = None
    bitsandbytes: str | None = None
    pins: tuple[str, ...] = ()
    axis: str = ""
    excluded: str | None = None
    resolution: str = "pinned"

    @property
    def active(self) -> bool:
        """Whether the cell is run (not excluded)."""
        return self.excluded is None

    def requirements(self) -> list[str]:
        """The ``==`` pins of the cell (the axes it names) followed by its extra pins."""
        named = [(axis, getattr(self, axis)) for axis in _VERSION_AXES]
        return [f"{axis}=={version}" for axis, version in named if version is not None] + list(self.pins)

    def resolver_options(self) -> list[str]:
        """Extra ``uv pip install`` options of the cell's resolution."""
        return {"pinned": [], "highest": ["--upgrade"], "lowest-direct": ["--resolution", "lowest-direct"]}[
            self.resolution
        ]


def load_cells(path: str | Path = CELLS_FILE) -> list[Cell]:
    """Read and validate the cells file.

    Args:
        path: The TOML file with ``[[cell]]`` tables.

    Returns:
        The cells in file order.

    Raises:
        MatrixError: If the file is missing, not TOML, or a cell is malformed or duplicated.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise MatrixError(f"{path}: cannot read cells: {exc}") from exc
    if data.get("schema") != SCHEMA:
        raise MatrixError(f"{path}: expected schema = {SCHEMA}, found {data.get('schema')!r}")
    raw_cells = data.get("cell")
    if not isinstance(raw_cells, list) or not raw_cells:
        raise MatrixError(f"{path}: no [[cell]] tables")
    cells: list[Cell] = []
    seen: set[str] = set()
    known = {"id", *AXES, "pins", "axis", "excluded", "resolution"}
    for index, raw in enumerate(raw_cells):
        where = f"{path}: cell #{index + 1}"
        unknown = sorted(set(raw) - known)
        if unknown:
            raise MatrixError(f"{where}: unknown keys {unknown}")
        resolution = raw.get("resolution", "pinned")
        if resolution not in RESOLUTIONS:
            raise MatrixError(f"{where}: resolution must be one of {RESOLUTIONS}, found {resolution!r}")
        required = ("id", *REQUIRED_AXES) if resolution == "pinned" else ("id", "python")
        for key in (*required, *(axis for axis in AXES if axis in raw)):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise MatrixError(f"{where}: '{key}' must be a non-empty string")
        if resolution != "pinned" and any(axis in raw for axis in _VERSION_AXES):
            raise MatrixError(f"{where}: a '{resolution}' cell resolves its versions; it pins none of {_VERSION_AXES}")
        if not _ID_RE.match(raw["id"]):
            raise MatrixError(f"{where}: id {raw['id']!r} may only use letters, digits, '.', '_' and '-'")
        if raw["id"] in seen:
            raise MatrixError(f"{where}: duplicate id {raw['id']!r}")
        seen.add(raw["id"])
        if not re.fullmatch(r"3\.\d+", raw["python"]):
            raise MatrixError(f"{where}: python must look like '3.11', found {raw['python']!r}")
        pins = raw.get("pins", [])
        if not isinstance(pins, list) or not all(isinstance(p, str) for p in pins):
            raise MatrixError(f"{where}: 'pins' must be a list of strings")
        excluded = raw.get("excluded")
        if excluded is not None and (not isinstance(excluded, str) or not excluded.strip()):
            raise MatrixError(f"{where}: 'excluded' must be a non-empty reason")
        cells.append(
            Cell(
                id=raw["id"],
                python=raw["python"],
                **{axis: raw.get(axis) for axis in _VERSION_AXES},
                pins=tuple(pins),
                axis=str(raw.get("axis", "")),
                excluded=excluded,
                resolution=resolution,
            )
        )
    return cells


def active_cells(cells: Iterable[Cell]) -> list[Cell]:
    """The cells that are run, in file order."""
    return [cell for cell in cells if cell.active]


def github_matrix(nox_listing: Sequence[Mapping[str, Any]], session: str = "compat") -> dict[str, list[dict[str, str]]]:
    """Turn ``nox -l --json`` output into a GitHub Actions ``strategy.matrix`` value.

    Args:
        nox_listing: The parsed JSON list that ``nox -l --json`` prints.
        session: The parametrized session to keep.

    Returns:
        ``{"include": [{"session": ..., "cell": ..., "python": ...}, ...]}`` in listing order.
    """
    include = []
    for entry in nox_listing:
        if entry.get("name") != session:
            continue
        call_spec = entry.get("call_spec") or {}
        include.append(
            {
                "session": str(entry["session"]),
                "cell": str(call_spec.get("cell", "")),
                "python": str(entry.get("python") or ""),
            }
        )
    return {"include": include}
