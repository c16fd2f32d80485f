"""One pass from a checkpoint (directory or hub id) to the tensors of an InternViT-based backbone.

:func:`load_checkpoint` is the only way ``internvl2_5_4b`` and ``earthmind_v1`` read weights, whatever the
layout their publishers ship (:data:`LAYOUTS`): it finds the directory (or the hub snapshot), reads
``config.json`` as data, detects the layout from its ``model_type``, translates the config into native settings
(:mod:`~earthmind_compat.backbones.convert`), builds the parts the layout holds on the meta device (nothing
allocated), plans every tensor name through the layout's key map, compares the planned shapes with the
safetensors headers, and only then reads the tensors of the parts the backbone asked for, opening only the
shards that hold them. The backbone then loads each part strictly (:func:`load_strict`).

No code from a checkpoint runs: ``auto_map`` is tolerated only for the remote layouts, whose configs and tensors
are read as data; any other config asking for remote code is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from earthmind_compat.backbones.base import CheckpointLayout
from earthmind_compat.backbones.convert import (
    INTERNVIT_RULES,
    INTERNVL_CHAT_RULES,
    KEY_RULES,
    NATIVE_MODEL_RULES,
    NATIVE_VISION_RULES,
    KeyRule,
    RemoteSettings,
    convert_checkpoint,
    native_settings,
    remote_settings,
    split_layout,
)
from earthmind_compat.errors import WeightsError
from earthmind_compat.weights import CheckpointFiles, read_config, refuse_remote_code, resolve_weights_dir

#: The parts of an InternVL-family checkpoint that backbones load.
VISION_TOWER, PROJECTOR, GATE = "vision_tower", "projector", "gate"

#: How messages name each part.
PART_NAMES = {
    VISION_TOWER: "vision tower",
    PROJECTOR: "projector (mlp1)",
    GATE: "cross-modal gate (EarthMind's local_query)",
}


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout: how to recognise it, what it holds and how its names and config translate.

    Attributes:
        checkpoint_layout: ``model_type`` values and description (what a backbone spec lists).
        parts: The parts its tensors fill.
        rules: Its key map.
        settings: Its config translation (:func:`~earthmind_compat.backbones.convert.native_settings` or
            :func:`~earthmind_compat.backbones.convert.remote_settings`).
        remote: Whether it is a remote-code layout (``auto_map`` is then read past, never run).
    """

    checkpoint_layout: CheckpointLayout
    parts: tuple[str, ...]
    rules: tuple[KeyRule, ...]
    settings: Callable[[dict, Path], RemoteSettings]
    remote: bool = False

    @property
    def model_types(self) -> tuple[str, ...]:
        """The ``model_type`` values of this layout."""
        return self.checkpoint_layout.model_types


def _layout(model_type: str, description: str, parts: tuple[str, ...], rules, settings, remote=False) -> Layout:
    return Layout(CheckpointLayout((model_type,), {}, description), parts, rules, settings, remote)


#: Every InternVL-family layout, by ``model_type``.
LAYOUTS: dict[str, Layout] = {
    layout.model_types[0]: layout
    for layout in (
        _layout(
            "internvl",
            "native transformers InternVLForConditionalGeneration / InternVLModel (the -hf repositories)",
            (VISION_TOWER, PROJECTOR),
            NATIVE_MODEL_RULES,
            native_settings,
        ),
        _layout(
            "internvl_vision",
            "native transformers InternVLVisionModel (the tower alone)",
            (VISION_TOWER,),
            NATIVE_VISION_RULES,
            native_settings,
        ),
        _layout(
            "intern_vit_6b",
            "InternVL's standalone InternViT release in its remote-code layout (e.g. "
            "OpenGVLab/InternViT-6B-448px-V2_5), read as data",
            (VISION_TOWER,),
            INTERNVIT_RULES,
            remote_settings,
            remote=True,
        ),
        _layout(
            "internvl_chat",
            "InternVL's release in its remote-code layout (e.g. OpenGVLab/InternVL2_5-4B), read as data",
            (VISION_TOWER, PROJECTOR),
            INTERNVL_CHAT_RULES,
            remote_settings,
            remote=True,
        ),
        _layout(
            "sa2va_chat",
            "EarthMind's release in its remote-code layout (Sa2VA, e.g. sy1998/EarthMind-4B), read as data",
            (VISION_TOWER, PROJECTOR, GATE),
            KEY_RULES,
            remote_settings,
            remote=True,
        ),
    )
}

#: What the backbones' specs list as the layouts they read.
CHECKPOINT_LAYOUTS: tuple[CheckpointLayout, ...] = tuple(layout.checkpoint_layout for layout in LAYOUTS.values())

#: Builds, from the settings of a checkpoint, the modules of the parts it asks for as the checkpoint stores
#: them (its patch kernel's bands, its image size): ``build(settings, parts) -> {part: module}``.
PartBuilder = Callable[[dict, Collection[str]], Mapping[str, nn.Module]]


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` found: the layout, the settings to build with, and the tensors per part.

    Attributes:
        directory: Where the files are (a hub snapshot for a hub id).
        layout: The detected layout.
        settings: The preset settings updated from the checkpoint's config (build the backbone with these).
        projector_layer: Index of the vision layer whose output the projector reads.
        parts: ``{part: state dict}`` of every requested part, native names, the released patch kernel.
    """

    directory: Path
    layout: Layout
    settings: dict
    projector_layer: int
    parts: dict[str, dict[str, torch.Tensor]]


def detect_layout(config: dict, directory: Path, accepted: Collection[str] | None = None) -> Layout:
    """The layout of a checkpoint from its ``config.json``.

    Args:
        config: The parsed ``config.json``.
        directory: Its directory (for messages).
        accepted: ``model_type`` values the caller reads (default: every layout).

    Raises:
        UnsafeCheckpointError: for a config that asks for remote code of a model that is not read as data.
        WeightsError: for any other model type.
    """
    model_type = config.get("model_type")
    layout = LAYOUTS.get(str(model_type))
    if layout is None or not layout.remote:
        refuse_remote_code(config, directory)
    names = tuple(accepted) if accepted is not None else tuple(LAYOUTS)
    if layout is None or model_type not in names:
        raise WeightsError(
            f"{directory} holds a {model_type!r} checkpoint; expected an InternVL-family checkpoint (model_type "
            f"{', '.join(map(repr, names))}; the layouts are listed in the README's checkpoint table)."
        )
    return layout


def load_checkpoint(
    weights: str | os.PathLike,
    defaults: dict,
    build: PartBuilder,
    parts: Collection[str],
    allow_pickle: bool = False,
    accepted: Collection[str] | None = None,
) -> LoadedCheckpoint:
    """Read an InternVL-family checkpoint in one pass (see the module docstring).

    Args:
        weights: A local directory or a hub id.
        defaults: The backbone's preset settings; the checkpoint's config overrides what it states.
        build: Builds the parts from settings (called once, on the meta device).
        parts: The parts the backbone loads (``vision_tower``, ``projector``, ``gate``).
        allow_pickle: Read pickle checkpoints with ``weights_only=True`` when no safetensors exist.
        accepted: ``model_type`` values the backbone reads (default: every layout).

    Returns:
        The layout, the settings and the tensors of ``parts``.

    Raises:
        WeightsError: naming the problem and the fix: no such directory or cached hub id, unknown layout, a
            part the layout does not hold, a config that does not describe its tensors, missing or unexpected
            tensors, wrong shapes, missing shards, corrupt files.
    """
    directory = resolve_weights_dir(weights)
    config = read_config(directory)
    layout = detect_layout(config, directory, accepted)
    absent = [part for part in parts if part not in layout.parts]
    if absent:
        lacking, holding = (
            " or ".join(PART_NAMES[p] for p in absent),
            " and ".join(PART_NAMES[p] for p in layout.parts),
        )
        raise WeightsError(
            f"{directory} ({layout.checkpoint_layout.description}) holds no {lacking}: it has the {holding}. Build "
            "the backbone without what it lacks (with_projector=False; for EarthMind one modality), or load a "
            "checkpoint that holds it."
        )
    translated = layout.settings(config, directory)
    settings = {**defaults, **{k: v for k, v in translated.vision.items() if v is not None}}
    files = CheckpointFiles(directory, allow_pickle=allow_pickle, config=config)
    expected = expected_shapes(build, settings, layout.parts)
    state = convert_checkpoint(files, expected, layout.rules, parts=set(parts))
    grouped = split_layout(state)
    return LoadedCheckpoint(
        directory, layout, settings, translated.projector_layer, {part: grouped[part] for part in parts}
    )


def expected_shapes(build: PartBuilder, settings: dict, parts: Collection[str]) -> dict[str, torch.Size]:
    """Native key -> shape of every tensor of ``parts`` as ``build`` makes them, on the meta device (no memory)."""
    with torch.device("meta"):
        modules = build(settings, parts)
    return {
        f"{part}.{key}": value.shape for part, module in modules.items() for key, value in module.state_dict().items()
    }


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], directory, what: str) -> None:
    """Load ``state`` into ``module`` requiring every parameter filled and every tensor used.

    Raises:
        WeightsError: listing missing and unexpected keys, or shapes that differ.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if wrong_shape:
            details.append(
                "wrong shape "
                + ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong_shape[:5])
            )
        raise WeightsError(f"The {what} checkpoint in {directory} does not match the model: {'; '.join(details)}.")
    module.load_state_dict(state, strict=True)
