"""What a fine-tune learned, without the frozen base: export, load back, and merge LoRA for deployment.

A LoRA / QLoRA fine-tune changes little of a multi-billion-parameter model: the adapters, the layers the
backbone adds to the released model (Granite's patch embedding) and the neck, decoder and head TerraTorch
builds. :func:`export_adapters` writes exactly those tensors, as safetensors, from a fine-tuned model or
TerraTorch task; :func:`load_adapters` puts them back into a freshly built model with the same backbone
settings, technique and base weights (``weights=``); :func:`merge_lora` folds the adapters into a
full-precision base for deployment.

The frozen base is recognised from the model itself, not from names: inside every earthmind-compat
backbone, a tensor is base when it is neither an adapter, nor part of the backbone's ``new_modules``, nor a
parameter that trains. Everything outside the backbones (necks, decoder, head, their BatchNorm statistics)
is exported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from earthmind_compat.backbones.base import TokenBackbone
from earthmind_compat.backbones.state_match import CheckpointMismatchError, technique_of
from earthmind_compat.errors import ConfigurationError, WeightsError

#: ``format`` entry of the safetensors metadata written by :func:`export_adapters`.
ADAPTER_FORMAT = "earthmind-compat-adapters/1"


@dataclass
class AdapterExport:
    """What :func:`export_adapters` wrote.

    Attributes:
        path: The safetensors file.
        tensors: Number of tensors in it.
        bytes: Bytes of tensor data in it.
        technique: The technique of the backbone(s) it was exported from.
    """

    path: Path
    tensors: int
    bytes: int
    technique: str


def _backbones(model: nn.Module) -> dict[str, TokenBackbone]:
    found = {path: module for path, module in model.named_modules() if isinstance(module, TokenBackbone)}
    if not found:
        raise ConfigurationError(
            f"{type(model).__name__} holds no earthmind-compat backbone; export_adapters and load_adapters work on "
            "a backbone, a TerraTorch model built with one, or the TerraTorch task around it."
        )
    return found


def base_keys(model: nn.Module) -> set[str]:
    """State-dict keys of ``model`` that belong to the frozen base of its backbones (not exported)."""
    keys: set[str] = set()
    for path, backbone in _backbones(model).items():
        prefix = f"{path}." if path else ""
        new = tuple(f"{name}." for name in getattr(backbone, "new_modules", ()))
        trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
        for key in backbone.state_dict():
            if ".lora_" in key or key.startswith(new) or key in trainable:
                continue
            keys.add(prefix + key)
    return keys


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` that a fine-tune changed or added: everything but the frozen base."""
    base = base_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in base and isinstance(v, torch.Tensor)}


def _technique(model: nn.Module) -> str:
    return "+".join(sorted({technique_of(list(b.state_dict())) for b in _backbones(model).values()}))


def export_adapters(model: nn.Module, path: str | os.PathLike) -> AdapterExport:
    """Write what a fine-tune learned (adapters, new backbone layers, neck, decoder, head) to safetensors.

    Args:
        model: A fine-tuned backbone, TerraTorch model, or TerraTorch task (a ``LightningModule``).
        path: Output file, conventionally ``*.safetensors``; its directory is created.

    Returns:
        An :class:`AdapterExport` with the tensor count and bytes written.

    Raises:
        ConfigurationError: if ``model`` holds no earthmind-compat backbone.
        WeightsError: if the file cannot be written.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state(model).items()}
    technique = _technique(model)
    path = Path(path)
    metadata = {"format": ADAPTER_FORMAT, "technique": technique, "model": type(model).__name__}
    metadata["backbones"] = json.dumps({p or ".": b.describe() for p, b in _backbones(model).items()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata=metadata)
    except OSError as exc:
        raise WeightsError(
            f"Could not write the adapters to {path}: {exc.strerror or exc}. Choose a writable path."
        ) from None
    size = sum(t.numel() * t.element_size() for t in state.values())
    return AdapterExport(path=path, tensors=len(state), bytes=size, technique=technique)


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an :func:`export_adapters` file into a freshly built model with the same settings, strictly.

    The model must have been built as at training time (backbone, preset, bands, technique, necks, decoder)
    and hold the same base weights (the same ``weights=``); every tensor the file holds must exist in it with
    the same shape, and every tensor a fine-tune trains must be in the file.

    Args:
        model: The freshly built backbone, TerraTorch model or task.
        path: The safetensors file.

    Returns:
        ``model``, with the adapters and trained layers in place.

    Raises:
        WeightsError: if the file cannot be read or is not an adapter export.
        CheckpointMismatchError: if it was exported from a differently built model.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path} is not a readable safetensors file: {exc}.") from None
    if metadata.get("format") != ADAPTER_FORMAT:
        raise WeightsError(
            f"{path} is not an earthmind-compat adapter export (format {metadata.get('format')!r}, expected "
            f"{ADAPTER_FORMAT!r}); write one with earthmind_compat.optimize.export_adapters."
        )
    ours = _technique(model)
    if metadata.get("technique") != ours:
        raise CheckpointMismatchError(
            f"{path} holds adapters of a model built with technique {metadata.get('technique')!r}; this model uses "
            f"{ours!r}. Build it with backbone_technique: {metadata.get('technique')}."
        )
    own = model.state_dict()
    unknown = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(tensors) & set(own) if tuple(tensors[k].shape) != tuple(own[k].shape))
    absent = sorted(set(adapter_state(model)) - set(tensors))
    if unknown or wrong or absent:
        details = []
        if unknown:
            details.append(f"tensors this model does not have: {unknown[:3]}")
        if wrong:
            details.append(
                "other shapes: " + ", ".join(f"{k} {list(tensors[k].shape)} vs {list(own[k].shape)}" for k in wrong[:3])
            )
        if absent:
            details.append(f"trained tensors missing from the file: {absent[:3]}")
        raise CheckpointMismatchError(
            f"{path} was exported from a differently built model ({'; '.join(details)}). Build the model with the "
            f"settings it was trained with: {metadata.get('backbones', '?')}."
        )
    own.update(tensors)
    model.load_state_dict(own, strict=True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter of ``model`` into its full-precision base layer and remove the adapters.

    The merged model computes what the adapted one did (up to float rounding) with the plain layers only,
    for deployment without peft.

    Args:
        model: A model whose backbone has LoRA adapters on full-precision layers.

    Returns:
        ``model``, changed in place.

    Raises:
        ConfigurationError: if there are no adapters, or the base layers are quantized (merging into 4-bit or
            8-bit weights would re-quantize them and lose the fine-tune's precision; export the adapters instead).
    """
    from peft.tuners.lora import LoraLayer

    layers = [(path, module) for path, module in model.named_modules() if isinstance(module, LoraLayer)]
    if not layers:
        raise ConfigurationError(f"{type(model).__name__} has no LoRA adapters to merge.")
    for path, layer in layers:
        base = layer.get_base_layer()
        if type(base) is not nn.Linear:
            raise ConfigurationError(
                f"{path} adapts a {type(base).__name__}, not a full-precision nn.Linear; merging into quantized "
                "weights would re-quantize them. Keep the adapters separate (export_adapters), or fine-tune with "
                "technique 'lora' to merge."
            )
    for path, layer in layers:
        layer.merge(safe_merge=True)
        model.set_submodule(path, layer.get_base_layer())
    return model
