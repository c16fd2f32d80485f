"""What every earthmind-compat backbone shares: its spec, the TerraTorch contract, input checks and layer choice.

Each backbone class declares one :class:`BackboneSpec` (``spec``): its registered name, presets, input sizes,
LoRA targets, hub id and checkpoint layouts. Code outside the class (the builders, ``check``, ``benchmark``,
the memory planner, LoRA, the tests) reads these facts from the spec, never from tables of its own, so a
backbone is added in its own module (plus one entry in :data:`earthmind_compat.backbones.BACKBONE_CLASSES`).

Backbone classes know nothing of the memory techniques (:mod:`earthmind_compat.optimize`, a higher layer):
the registered builders in :mod:`earthmind_compat.builders` build the class and then apply them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from earthmind_compat.arguments import check_boolean_call
from earthmind_compat.backbones.state_match import check_state_matches
from earthmind_compat.errors import ConfigurationError, InputError, did_you_mean, unknown_name

#: Keys a TerraTorch config may hand to every backbone although they are meant for the factory or task
#: (``backbone_padding``, ``backbone_patch_size``...). They are accepted and ignored.
TERRATORCH_PASSTHROUGH_KWARGS = frozenset({"padding", "patch_size", "model_bands", "num_frames"})


@dataclass(frozen=True)
class CheckpointLayout:
    """One checkpoint layout a backbone reads.

    Attributes:
        model_types: The ``model_type`` values of its ``config.json``.
        prefixes: Per part of the backbone, the key prefixes its tensors sit under, tried in order (empty when a
            key map renames the tensors instead, see :mod:`earthmind_compat.backbones.convert`).
        description: What it is and who publishes it, for messages and documentation.
    """

    model_types: tuple[str, ...]
    prefixes: Mapping[str, tuple[str, ...]]
    description: str


@dataclass(frozen=True)
class BackboneSpec:
    """Everything code outside a backbone class needs to know about it: one place per backbone.

    Attributes:
        name: The name registered in TerraTorch (``backbone: <name>``) and the builder's ``__name__``.
        family: Model family (``internvl``, ``earthmind``, ``granite``), e.g. for per-family test tolerances.
        summary: One line describing the backbone (the registered builder's docstring).
        presets: Constructor settings per preset: ``tiny`` for tests (CPU forward in milliseconds), ``full``
            the published dimensions, maybe more.
        input_sizes: Side in pixels of the square input used per preset by ``earthmind-compat check`` (at
            ``tiny``) and by the benchmarks: a multiple of the patch size (and of twice it, for the projector).
        lora_targets: Module names LoRA adapts (peft matches them as path suffixes), pinned so that a renamed
            layer in a transformers release is noticed (a test compares them with the linear layers found in
            the blocks); ``None`` adapts every linear layer of the blocks.
        hub_id: Hub repository of the released weights, used for ``pretrained=True``.
        checkpoint_layouts: The checkpoint layouts the backbone reads (``weights=``).
        cls_token: Whether the token tensors start with a CLS token at the default settings.
    """

    name: str
    family: str
    summary: str
    presets: Mapping[str, Mapping[str, object]]
    input_sizes: Mapping[str, int]
    lora_targets: tuple[str, ...] | None
    hub_id: str
    checkpoint_layouts: tuple[CheckpointLayout, ...]
    cls_token: bool

    def input_size(self, preset: str) -> int:
        """Side in pixels of the square check / benchmark input at ``preset``.

        Raises:
            UnknownNameError: for a preset the backbone does not have.
        """
        if preset not in self.input_sizes:
            raise unknown_name(f"{self.name} preset", preset, self.presets)
        return self.input_sizes[preset]

    @property
    def model_types(self) -> tuple[str, ...]:
        """Every checkpoint ``model_type`` the backbone reads, over all its layouts."""
        return tuple(t for layout in self.checkpoint_layouts for t in layout.model_types)


def choose_preset(family: str, presets: Mapping[str, Mapping[str, object]], preset: str) -> dict:
    """Return a copy of the config dictionary of ``preset``.

    Raises:
        UnknownNameError: naming the valid presets, with the closest one.
    """
    if preset not in presets:
        raise unknown_name(f"{family} preset", preset, presets)
    return dict(presets[preset])


def argument_names(function: object) -> list[str]:
    """Names of the keyword arguments of ``function`` (without ``self`` and ``**kwargs``)."""
    import inspect

    return [
        name
        for name, parameter in inspect.signature(function).parameters.items()
        if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
    ]


def reject_unknown_kwargs(owner: str, kwargs: dict, accepted: Sequence[str]) -> None:
    """Raise for a keyword argument nobody reads, so a typo never passes silently.

    Args:
        owner: Class name used in the message.
        kwargs: The leftover ``**kwargs`` of a constructor.
        accepted: The constructor's own argument names (for the suggestion).

    Raises:
        ConfigurationError: naming the unknown argument and the closest valid one.
    """
    unknown = sorted(set(kwargs) - TERRATORCH_PASSTHROUGH_KWARGS)
    if unknown:
        hints = "".join(did_you_mean(name, accepted) for name in unknown)
        raise ConfigurationError(
            f"{owner} got unknown argument(s) {unknown}.{hints} Valid arguments: {', '.join(sorted(accepted))} "
            "(in a TerraTorch config write them as backbone_<name>)."
        )


def default_out_indices(num_layers: int) -> list[int]:
    """Four layers spread over the depth, ending at the last one (e.g. 24 layers -> [5, 11, 17, 23])."""
    picks = sorted({max(0, num_layers * k // 4 - 1) for k in (1, 2, 3, 4)})
    return picks


def resolve_out_indices(out_indices: Sequence[int] | None, num_layers: int) -> list[int]:
    """Validate layer indices (negative ones count from the end) and return them as non-negative ints.

    Raises:
        ConfigurationError: if an index is out of range, repeated or not an integer.
    """
    if out_indices is None:
        return default_out_indices(num_layers)
    if isinstance(out_indices, int):
        out_indices = [out_indices]
    resolved = []
    for index in out_indices:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ConfigurationError(f"out_indices must be integers, got {index!r}.")
        if not -num_layers <= index < num_layers:
            raise ConfigurationError(
                f"out_indices entry {index} is outside the {num_layers} layers of this model; "
                f"use 0..{num_layers - 1} or negative indices from -{num_layers}."
            )
        resolved.append(index % num_layers)
    if not resolved:
        raise ConfigurationError("out_indices is empty; give at least one layer index or leave it unset.")
    if len(set(resolved)) != len(resolved):
        raise ConfigurationError(f"out_indices {list(out_indices)} names a layer twice.")
    return resolved


def check_image(
    x: object,
    channels: int,
    patch_size: int,
    *,
    device: torch.device | None = None,
    modality: str | None = None,
    owner: str = "The backbone",
    bands: Sequence[str] | None = None,
) -> torch.Tensor:
    """Check an image batch ``[B, channels, H, W]`` before it reaches a model, raising :class:`InputError` with the fix.

    Args:
        x: The batch (or one modality of it).
        channels: Bands the backbone was built for.
        patch_size: H and W must be positive multiples of it.
        device: The backbone's device (``None`` or meta: any device is accepted).
        modality: Name of the modality ``x`` is (messages then name it), or ``None`` for a whole input.
        owner: Who expects ``x``, for the messages (the backbone's class name).
        bands: The backbone's band names, for the message about a wrong band count.

    Returns:
        ``x`` unchanged.
    """
    subject = f"Modality {modality!r}" if modality is not None else owner
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{subject} expects a torch.Tensor of shape [B, {channels}, H, W], got {type(x).__name__}.")
    if x.ndim != 4:
        extra = " For a time series, fold time into the batch or the bands first." if x.ndim == 5 else ""
        raise InputError(f"{subject} expects a 4-D tensor [B, {channels}, H, W], got shape {tuple(x.shape)}.{extra}")
    batch, count, height, width = x.shape
    if batch == 0:
        raise InputError(f"{subject} got an empty batch (B=0); pass at least one image.")
    if count != channels and modality is not None:
        raise InputError(
            f"{subject} has {count} bands but the backbone was built for {channels}; fix the modalities argument "
            "or the datamodule's bands."
        )
    if count != channels:
        named = f" {list(bands)}" if bands else ""
        raise InputError(
            f"Got {count} input bands but the backbone was built for {channels}{named}; "
            f"build it with in_chans={count} (or matching bands=[...]) or select the right bands in the datamodule."
        )
    p = patch_size
    if height < p or width < p or height % p or width % p:
        raise InputError(
            f"{subject} got image size {height}x{width}, not a positive multiple of the patch size {p}. Resize or pad "
            f"to a multiple of {p} (e.g. {max(p, round(height / p) * p)}x{max(p, round(width / p) * p)}); "
            "TerraTorch's EncoderDecoderFactory pads automatically."
        )
    if not torch.is_floating_point(x):
        raise InputError(
            f"{subject} got dtype {x.dtype}; convert integer reflectance to float and normalise it "
            "(e.g. x.float() / 10000 followed by the band means and stds) before the backbone."
        )
    if device is not None and device.type != "meta" and x.device != device:
        raise InputError(
            f"Input is on {x.device} but the backbone is on {device}; move one of them "
            f"(x.to('{device}') or backbone.to('{x.device}'))."
        )
    # a finite sum proves every value finite (one cheap reduction); only a non-finite sum, which an
    # overflow could also cause, pays for the element-wise test
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        raise InputError(f"{subject} got NaN or Inf values; fill or mask no-data pixels before the backbone.")
    return x


def _checking_booleans(init: Callable, owner: str) -> Callable:
    """``init`` preceded by :func:`~earthmind_compat.arguments.check_boolean_call` ("false" is not False)."""

    @functools.wraps(init)
    def __init__(self, *args: object, **kwargs: object) -> None:
        check_boolean_call(init, owner, (self, *args), kwargs)
        init(self, *args, **kwargs)

    return __init__


class TokenBackbone(nn.Module):
    """Base class: a TerraTorch backbone returning one ``[B, N, C]`` token tensor per selected layer.

    A subclass declares its :class:`BackboneSpec` as ``spec`` and starts its ``__init__`` with
    ``super().__init__(preset, kwargs)`` (its preset name and its leftover ``**kwargs``). Every boolean argument
    of its constructor is checked to be a real ``bool`` before the constructor runs.

    Attributes:
        out_channels: Channel width of each returned feature, as TerraTorch's factory reads it.
        patch_size: Side of a square patch in pixels; TerraTorch pads inputs to a multiple of it.
        in_chans: Number of input bands.
        bands: Band names, or ``None``.
        has_cls_token: Whether each returned token tensor starts with a CLS token.
        merge_factors: Per returned feature, how many patches per side one of its tokens covers (1 on the
            patch grid, 2 on a grid merged by a projector's pixel shuffle); necks read it as
            ``TokensToGrid(merge_factors=...)``.
        new_modules: Submodules that are not part of the released model and start from a fresh
            initialisation (e.g. a patch embedding in front of a language model). LoRA keeps them trainable,
            and an adapter export includes them.
    """

    spec: ClassVar[BackboneSpec]
    out_channels: list[int]
    patch_size: int
    in_chans: int
    bands: list[str] | None
    has_cls_token: bool
    merge_factors: list[int]
    new_modules: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:
            cls.__init__ = _checking_booleans(init, cls.__name__)

    def __init__(self, preset: str, kwargs: Mapping[str, object]) -> None:
        """What every backbone does first: refuse unknown arguments, remember the preset.

        Args:
            preset: The preset name the subclass was given (see :meth:`preset_settings`).
            kwargs: The subclass constructor's leftover ``**kwargs``.
        """
        super().__init__()
        # a checkpoint of a differently built backbone fails in one sentence, not with hundreds of keys
        self._register_load_state_dict_pre_hook(check_state_matches, with_module=True)
        reject_unknown_kwargs(type(self).__name__, kwargs, argument_names(type(self).__init__))
        self.preset = preset

    @property
    def family(self) -> str:
        """The model family (``spec.family``)."""
        return self.spec.family

    def preset_settings(self) -> dict:
        """A copy of the settings of this backbone's preset.

        Raises:
            UnknownNameError: naming the valid presets, with the closest one.
        """
        return choose_preset(type(self).__name__.removesuffix("Backbone"), self.spec.presets, self.preset)

    def weights_source(self, weights: str | None, pretrained: bool) -> str | None:
        """``weights``, or the released weights' hub id (``spec.hub_id``) when only ``pretrained`` is set."""
        return self.spec.hub_id if weights is None and pretrained else weights

    def describe(self) -> str:
        """The class and the settings a checkpoint must have been written with, for messages."""
        applied = getattr(self, "optimized", None)
        technique = applied.technique if applied is not None else "none"
        preset, in_chans = getattr(self, "preset", "?"), getattr(self, "in_chans", "?")
        return f"{type(self).__name__}(preset={preset!r}, in_chans={in_chans}, technique={technique!r})"

    def check_input(self, x: object) -> torch.Tensor:
        """Check an image batch before it reaches the model, raising :class:`InputError` with the fix.

        Args:
            x: Expected ``[B, in_chans, H, W]`` floating-point tensor, H and W multiples of ``patch_size``, on the
                backbone's device.

        Returns:
            ``x`` unchanged.
        """
        return check_image(
            x, self.in_chans, self.patch_size, device=self.weight_device(), owner=type(self).__name__, bands=self.bands
        )

    def weight_device(self) -> torch.device | None:
        """Device of the backbone's first parameter (``None`` without parameters), what inputs must be on."""
        weight = next(self.parameters(), None)
        return None if weight is None else weight.device

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(rows, cols)`` for an input of ``height`` x ``width`` pixels."""
        return height // self.patch_size, width // self.patch_size
