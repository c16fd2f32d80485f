"""Finding and reading checkpoints: local directories or hub ids, safetensors only.

Nothing here runs code from a checkpoint: ``trust_remote_code`` is never set, and pickle files
(``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are refused unless the caller opts in with
``allow_pickle=True``, in which case they are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from earthmind_compat.errors import EarthMindCompatError, UnsafeCheckpointError, WeightsError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def hub_offline() -> bool:
    """Return True when Hugging Face offline mode is on (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(
        os.environ.get(v, "").lower() in {"1", "true", "yes", "on"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and os.sep not in parts[1]


def resolve_weights_dir(weights: str | os.PathLike) -> Path:
    """Return a local directory holding ``config.json`` and the checkpoint files.

    Args:
        weights: A local directory, or a hub id such as ``"OpenGVLab/InternVL2_5-4B"``. A hub id is
            fetched with ``huggingface_hub.snapshot_download`` (configs and safetensors only), from the local
            cache alone when offline mode is on.

    Returns:
        The directory.

    Raises:
        WeightsError: if the directory does not exist, is a file, or the hub id cannot be fetched.
    """
    path = Path(weights).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WeightsError(
            f"weights={str(weights)!r} is a file; pass the directory that holds config.json and the "
            "*.safetensors files (as written by save_pretrained)."
        )
    text = str(weights)
    if not _looks_like_hub_id(text):
        raise WeightsError(
            f"No weights directory at {text!r}. Pass an existing directory written by save_pretrained, "
            "or a hub id of the form 'owner/name'."
        )
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        return Path(
            snapshot_download(
                text,
                allow_patterns=["*.json", "*.safetensors"],
                local_files_only=offline,
                etag_timeout=5,
            )
        )
    except Exception as exc:  # huggingface_hub raises many types; all mean "not available here"
        hint = (
            "offline mode is on (HF_HUB_OFFLINE=1) and the files are not in the local cache"
            if offline
            else "the hub could not be reached or the repository does not exist"
        )
        raise WeightsError(
            f"Could not get weights {text!r}: {hint}. Download them on a connected machine with "
            f"`huggingface-cli download {text}` and pass the local directory as weights=... "
            f"({type(exc).__name__}: {exc})"
        ) from None


def read_config(directory: Path) -> dict:
    """Read ``config.json`` of a checkpoint directory.

    Raises:
        WeightsError: if it is missing or not valid JSON.
    """
    path = directory / "config.json"
    if not path.is_file():
        raise WeightsError(f"{directory} has no config.json; it does not look like a save_pretrained directory.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path} is not valid JSON ({exc}).") from None


def refuse_remote_code(config: dict, directory: Path) -> None:
    """Raise if a checkpoint config asks for remote code (``auto_map``), which is never run.

    Raises:
        UnsafeCheckpointError: naming the offending config entry and what to do instead.
    """
    if "auto_map" in config:
        raise UnsafeCheckpointError(
            f"{directory} needs remote code (config.json has auto_map, model_type={config.get('model_type')!r}). "
            "earthmind-compat never sets trust_remote_code. Use a checkpoint in the native transformers format "
            "(the '-hf' repositories); the remote layouts of InternVL (internvl_chat) and EarthMind (sa2va_chat) "
            "are read as data by internvl2_5_4b and earthmind_v1 (earthmind_compat.backbones.loader)."
        )


def safetensors_files(directory: Path, allow_pickle: bool = False) -> list[Path]:
    """List the checkpoint files to read, refusing pickles unless allowed.

    Raises:
        UnsafeCheckpointError: if only pickle files are present and ``allow_pickle`` is False.
        WeightsError: if there is no checkpoint file at all.
    """
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{directory} holds only pickle checkpoints ({', '.join(p.name for p in pickles)}), which can run "
            "arbitrary code when loaded. Convert them to safetensors, or pass allow_pickle=True to read them "
            "with torch.load(weights_only=True)."
        )
    if pickles:
        return pickles
    raise WeightsError(f"{directory} holds no *.safetensors file.")


@contextmanager
def open_safetensors(path: Path) -> Iterator[object]:
    """``safetensors.safe_open`` of one file: tensors are read only when asked for (``handle.get_tensor``).

    Raises:
        WeightsError: if the file, or a tensor read from it inside the ``with`` block, is truncated or corrupt.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except EarthMindCompatError:
        raise
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}. Download or save it again."
        ) from None


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        with open_safetensors(path) as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118  (not a dict)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UnsafeCheckpointError(
            f"{path} could not be read with torch.load(weights_only=True) ({type(exc).__name__}: {first_line}). "
            "It holds objects other than tensors, which earthmind-compat will not unpickle; convert it to "
            "safetensors on a machine you trust."
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


#: Index file that lists which shard holds each tensor of a sharded safetensors checkpoint.
SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointFiles:
    """The tensors of one checkpoint directory, read lazily: names first, shapes from headers, values on demand.

    A sharded checkpoint is read through its ``model.safetensors.index.json`` (every shard it names must be
    present); otherwise every ``*.safetensors`` file of the directory is a part. Only the files that hold a
    requested tensor are opened, and only the requested tensors are read. Pickle checkpoints (``allow_pickle``)
    cannot be read lazily and are loaded once, with ``torch.load(weights_only=True)``.

    Args:
        directory: The checkpoint directory.
        allow_pickle: Read pickle checkpoints when no safetensors exist.
        config: Its parsed ``config.json``, kept as :attr:`config` for readers that need both.

    Raises:
        WeightsError: if the index is unreadable or names a missing shard, or there is no checkpoint file.
        UnsafeCheckpointError: if only pickle files are present and ``allow_pickle`` is False.
    """

    def __init__(self, directory: Path, allow_pickle: bool = False, config: dict | None = None) -> None:
        self.directory = directory
        self.config = dict(config or {})
        self._pickled: dict[str, torch.Tensor] | None = None
        self._where: dict[str, Path] = {}
        index = directory / SAFETENSORS_INDEX
        if index.is_file():
            self._where = self._read_index(index)
            return
        files = safetensors_files(directory, allow_pickle=allow_pickle)
        if files[0].suffix != ".safetensors":
            self._pickled = {}
            for path in files:
                self._pickled.update(_read_file(path))
            return
        for path in files:
            with open_safetensors(path) as handle:
                self._where.update(dict.fromkeys(handle.keys(), path))

    def _read_index(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise WeightsError(
                f"{index} is not a valid safetensors index (no readable 'weight_map': {exc}). Download it again."
            ) from None
        shards = sorted(set(weight_map.values()))
        absent = [name for name in shards if not (self.directory / name).is_file()]
        if absent:
            raise WeightsError(
                f"{self.directory}: {SAFETENSORS_INDEX} lists {len(shards)} shards but {absent} "
                f"{'is' if len(absent) == 1 else 'are'} not there. Download the whole repository (every "
                "model-*.safetensors file) into that directory."
            )
        return {key: self.directory / name for key, name in weight_map.items()}

    @property
    def keys(self) -> list[str]:
        """Every tensor name of the checkpoint (no tensor is read)."""
        return list(self._pickled) if self._pickled is not None else list(self._where)

    def shapes(self, keys: Iterable[str]) -> dict[str, tuple[int, ...]]:
        """Shapes of ``keys``, from the safetensors headers (no tensor is read)."""
        if self._pickled is not None:
            return {key: tuple(self._pickled[key].shape) for key in keys}
        out: dict[str, tuple[int, ...]] = {}
        for path, names in self._by_file(keys).items():
            with open_safetensors(path) as handle:
                for key in names:
                    out[key] = tuple(handle.get_slice(key).get_shape())
        return out

    def load(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read ``keys`` only, opening only the files that hold them."""
        if self._pickled is not None:
            return {key: self._pickled[key] for key in keys}
        out: dict[str, torch.Tensor] = {}
        for path, names in self._by_file(keys).items():
            with open_safetensors(path) as handle:
                for key in names:
                    out[key] = handle.get_tensor(key)
        return out

    def _by_file(self, keys: Iterable[str]) -> dict[Path, list[str]]:
        grouped: dict[Path, list[str]] = {}
        for key in keys:
            grouped.setdefault(self._where[key], []).append(key)
        return grouped


def checkpoint_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors checkpoint, read from the file headers (no tensor is loaded).

    Returns an empty dict for pickle checkpoints, whose shapes cannot be read without loading them.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with open_safetensors(path) as handle:
            for key in handle.keys():  # noqa: SIM118  (a safetensors handle is not a dict)
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def check_shapes_on_meta(
    model: torch.nn.Module,
    directory: Path,
    prefixes: Iterable[str] = ("",),
    ignore: Iterable[str] = (),
) -> None:
    """Compare a checkpoint's tensor shapes with a model built on the meta device, before any allocation.

    A ``config.json`` that lacks the model's dimensions makes transformers fall back to its defaults (often the
    full published size), so building the model first could allocate gigabytes for a tiny checkpoint, or the
    other way round. Checking the shapes from the safetensors headers against a meta-device model costs
    nothing and fails in words.

    Args:
        model: The model as it would be built, on the meta device.
        directory: The checkpoint directory.
        prefixes: Key prefixes of the model inside the checkpoint, tried in order (the first that matches a
            model key is stripped).
        ignore: Model keys whose shapes may legitimately differ (e.g. a patch kernel adapted to other bands).

    Raises:
        WeightsError: if a tensor both have differs in shape, or the checkpoint has none of the model's tensors.
    """
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    found = checkpoint_shapes(directory)
    if not found:
        return
    ignore = set(ignore)
    matched = 0
    for key, shape in found.items():
        name = next((key[len(p) :] for p in prefixes if key.startswith(p) and key[len(p) :] in expected), None)
        if name is None or name in ignore:
            continue
        matched += 1
        if expected[name] != shape:
            raise WeightsError(
                f"{directory}: tensor {key} is {list(shape)} but the model built from its config.json expects "
                f"{list(expected[name])}. config.json does not describe these tensors (a missing dimension falls back "
                "to the library's default size); fix config.json or pass the directory it was saved with."
            )
    model_layers, checkpoint_layers = (
        _numbered_blocks(expected),
        _numbered_blocks(next((key[len(p) :] for p in prefixes if key.startswith(p)), key) for key in found),
    )
    absent = sorted(model_layers - checkpoint_layers, key=lambda block: (block[0], int(block[1])))
    if matched and absent:
        raise WeightsError(
            f"{directory}: the model built from its config.json has blocks the checkpoint does not hold (e.g. "
            f"{'.'.join(absent[0])}; {len(absent)} in all). config.json does not describe these tensors (a missing "
            "num_hidden_layers falls back to the library's default depth); fix config.json."
        )
    if matched == 0:
        raise WeightsError(
            f"{directory}: none of its {len(found)} tensors (e.g. {sorted(found)[:3]}) belongs to the model built from "
            "its config.json; is it a checkpoint of this model?"
        )


def _numbered_blocks(keys: Iterable[str]) -> set[tuple[str, str]]:
    """``(container path, index)`` of every numbered block in ``keys``.

    ``encoder.layer.3.mlp.fc1.weight`` gives ``("encoder.layer", "3")``.
    """
    blocks = set()
    for key in keys:
        parts = key.split(".")
        for position, part in enumerate(parts):
            if part.isdigit():
                blocks.add((".".join(parts[:position]), part))
                break
    return blocks
