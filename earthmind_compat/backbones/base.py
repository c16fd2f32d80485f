"""What every earthmind-compat backbone shares: the TerraTorch contract, input checks and layer choice."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from earthmind_compat.backbones.state_match import check_state_matches
from earthmind_compat.errors import ConfigurationError, InputError, did_you_mean, unknown_name

#: Keys a TerraTorch config may hand to every backbone although they are meant for the factory or task
#: (``backbone_padding``, ``backbone_patch_size``...). They are accepted and ignored.
TERRATORCH_PASSTHROUGH_KWARGS = frozenset({"padding", "patch_size", "model_bands", "num_frames"})


def choose_preset(family: str, presets: dict[str, dict], preset: str) -> dict:
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


class TokenBackbone(nn.Module):
    """Base class: a TerraTorch backbone returning one ``[B, N, C]`` token tensor per selected layer.

    Attributes:
        out_channels: Channel width of each returned feature, as TerraTorch's factory reads it.
        patch_size: Side of a square patch in pixels; TerraTorch pads inputs to a multiple of it.
        in_chans: Number of input bands.
        bands: Band names, or ``None``.
        has_cls_token: Whether each returned token tensor starts with a CLS token.
        new_modules: Submodules that are not part of the released model and start from a fresh
            initialisation (e.g. a patch embedding in front of a language model). LoRA keeps them trainable,
            and an adapter export includes them.
    """

    out_channels: list[int]
    patch_size: int
    in_chans: int
    bands: list[str] | None
    has_cls_token: bool
    new_modules: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # -- memory techniques (earthmind_compat.optimize): every backbone constructor accepts quantization=,
        # lora=, activation_checkpointing= and technique= and applies them after its own __init__ --
        from earthmind_compat.optimize.options import wrap_constructor

        wrap_constructor(cls)

    def __init__(self) -> None:
        super().__init__()
        # a checkpoint of a differently built backbone fails in one sentence, not with hundreds of keys
        self._register_load_state_dict_pre_hook(check_state_matches, with_module=True)

    def describe(self) -> str:
        """The class and the settings a checkpoint must have been written with, for messages."""
        applied = getattr(self, "optimized", None)
        technique = applied.technique if applied is not None else "none"
        preset, in_chans = getattr(self, "preset", "?"), getattr(self, "in_chans", "?")
        return f"{type(self).__name__}(preset={preset!r}, in_chans={in_chans}, technique={technique!r})"

    def check_input(self, x: object) -> torch.Tensor:
        """Check an image batch before it reaches the model, raising :class:`InputError` with the fix.

        Args:
            x: Expected ``[B, in_chans, H, W]`` floating-point tensor, H and W multiples of ``patch_size``.

        Returns:
            ``x`` unchanged.
        """
        if not isinstance(x, torch.Tensor):
            raise InputError(
                f"{type(self).__name__} expects a torch.Tensor of shape [B, {self.in_chans}, H, W], "
                f"got {type(x).__name__}."
            )
        if x.ndim != 4:
            extra = " For a time series, fold time into the batch or the bands first." if x.ndim == 5 else ""
            raise InputError(
                f"{type(self).__name__} expects a 4-D tensor [B, {self.in_chans}, H, W], got shape "
                f"{tuple(x.shape)}.{extra}"
            )
        batch, channels, height, width = x.shape
        if batch == 0:
            raise InputError("The batch is empty (B=0); pass at least one image.")
        if channels != self.in_chans:
            raise InputError(
                f"Got {channels} input bands but the backbone was built for {self.in_chans}"
                f"{' ' + str(self.bands) if self.bands else ''}; build it with in_chans={channels} "
                "(or matching bands=[...]) or select the right bands in the datamodule."
            )
        p = self.patch_size
        if height < p or width < p or height % p or width % p:
            raise InputError(
                f"Image size {height}x{width} is not a positive multiple of the patch size {p}. Resize or pad "
                f"to a multiple of {p} (e.g. {max(p, round(height / p) * p)}x{max(p, round(width / p) * p)}); "
                "TerraTorch's EncoderDecoderFactory pads automatically."
            )
        if not torch.is_floating_point(x):
            raise InputError(
                f"Input dtype is {x.dtype}; convert integer reflectance to float and normalise it "
                "(e.g. x.float() / 10000 followed by the band means and stds) before the backbone."
            )
        weight = next(self.parameters(), None)
        if weight is not None and weight.device.type != "meta" and x.device != weight.device:
            raise InputError(
                f"Input is on {x.device} but the backbone is on {weight.device}; move one of them "
                f"(x.to('{weight.device}') or backbone.to('{x.device}'))."
            )
        # a finite sum proves every value finite (one cheap reduction); only a non-finite sum, which an
        # overflow could also cause, pays for the element-wise test
        if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
            raise InputError("Input contains NaN or Inf values; fill or mask no-data pixels before the backbone.")
        return x

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(rows, cols)`` for an input of ``height`` x ``width`` pixels."""
        return height // self.patch_size, width // self.patch_size
