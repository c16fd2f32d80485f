"""InternVL2.5 vision tower (InternViT) as a TerraTorch backbone, from the native transformers classes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import InternVLConfig, InternVLVisionConfig, InternVLVisionModel, Qwen2Config
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

from earthmind_compat.arguments import resolve_dtype
from earthmind_compat.backbones.base import (
    TokenBackbone,
    argument_names,
    choose_preset,
    reject_unknown_kwargs,
    resolve_out_indices,
)
from earthmind_compat.bands import adapt_patch_weight, resolve_bands
from earthmind_compat.compat import first_tensor
from earthmind_compat.errors import InputError, WeightsError
from earthmind_compat.weights import (
    check_shapes_on_meta,
    find_prefix,
    load_tensors,
    read_config,
    refuse_remote_code,
    resolve_weights_dir,
)

#: Vision-tower presets. ``full`` is InternViT-300M-448px-V2.5 as used by InternVL2.5-1B/2B/4B/8B;
#: ``internvit_6b`` is InternViT-6B-448px-V2.5 of InternVL2.5-26B/38B/78B. ``text_hidden_size`` is the
#: width of the language model the projector feeds (Qwen2.5-3B for InternVL2.5-4B; for the 6B tower the
#: projector is sized for InternVL2.5-38B's Qwen2.5-32B — load a checkpoint to get another width).
INTERNVL_PRESETS: dict[str, dict] = {
    "tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "image_size": 56,
        "patch_size": 14,
        "attention_bias": True,
        "use_qk_norm": False,
        "norm_type": "layer_norm",
        "layer_scale_init_value": 0.1,
        "use_mean_pooling": True,
        "text_hidden_size": 64,
    },
    "full": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "image_size": 448,
        "patch_size": 14,
        "attention_bias": True,
        "use_qk_norm": False,
        "norm_type": "layer_norm",
        "layer_scale_init_value": 0.1,
        "use_mean_pooling": True,
        "text_hidden_size": 2048,
    },
    "internvit_6b": {
        "hidden_size": 3200,
        "num_hidden_layers": 45,
        "num_attention_heads": 25,
        "intermediate_size": 12800,
        "image_size": 448,
        "patch_size": 14,
        "attention_bias": False,
        "use_qk_norm": True,
        "norm_type": "rms_norm",
        "layer_scale_init_value": 0.1,
        "use_mean_pooling": True,
        "text_hidden_size": 5120,
    },
}

#: State-dict key of the patch-embedding kernel (adapted to the input bands, so its shape may differ).
_PATCH_KERNEL = "embeddings.patch_embeddings.projection.weight"

#: Pixel-shuffle factor of InternVL2.5's projector (every 2x2 block of tokens becomes one token).
DOWNSAMPLE_RATIO = 0.5


def pixel_shuffle(features: torch.Tensor, scale_factor: float = DOWNSAMPLE_RATIO) -> torch.Tensor:
    """InternVL's pixel shuffle on a ``[B, rows, cols, C]`` grid, also for non-square grids.

    It applies the same reshapes and permutes as ``InternVLModel.pixel_shuffle`` (so pretrained projector
    weights see channels in the order they were trained on) without assuming rows == cols.

    Returns:
        ``[B, rows * s, cols * s, C / s**2]``.
    """
    batch, rows, cols, channels = features.shape
    inverse = round(1 / scale_factor)
    if rows % inverse or cols % inverse:
        raise InputError(
            f"The token grid {rows}x{cols} must be divisible by {inverse} for InternVL's pixel shuffle; "
            f"use an image side that is a multiple of {inverse} patches."
        )
    out = features.reshape(batch, rows, cols // inverse, channels * inverse)
    out = out.permute(0, 2, 1, 3).contiguous()
    out = out.reshape(batch, cols // inverse, rows // inverse, channels * inverse * inverse)
    return out.permute(0, 2, 1, 3).contiguous()


def vision_config_from_preset(preset: dict, in_chans: int, image_size: int | None) -> InternVLVisionConfig:
    """Build the native :class:`InternVLVisionConfig` of a preset for ``in_chans`` input bands."""
    settings = {k: v for k, v in preset.items() if k != "text_hidden_size"}
    if image_size is not None:
        settings["image_size"] = image_size
    return InternVLVisionConfig(num_channels=in_chans, **settings)


def projector_config(vision_config: InternVLVisionConfig, text_hidden_size: int) -> InternVLConfig:
    """The :class:`InternVLConfig` that sizes the projector (the language model itself is never built)."""
    text_config = Qwen2Config(
        hidden_size=text_hidden_size,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        intermediate_size=text_hidden_size,
        vocab_size=16,
    )
    return InternVLConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        downsample_ratio=DOWNSAMPLE_RATIO,
        projector_hidden_act="gelu",
    )


class InternVLBackbone(TokenBackbone):
    """InternViT (the vision tower of InternVL2.5) returning per-layer tokens.

    Args:
        preset: ``"tiny"`` (tests), ``"full"`` (InternViT-300M, InternVL2.5-4B) or ``"internvit_6b"``.
        weights: Local directory or hub id of a native-format checkpoint (``InternVLVisionModel`` or a whole
            ``InternVLForConditionalGeneration``/``InternVLModel``, e.g. the ``-hf`` repositories).
        pretrained: With ``weights`` unset, True means the published ``OpenGVLab/InternVL2_5-4B-MPO-hf``.
        in_chans: Number of input bands (default 3, or ``len(bands)``).
        bands: Band names; RED/GREEN/BLUE reuse their pretrained kernels, others the RGB mean.
        out_indices: Transformer layers whose outputs are returned (default: four spread over the depth).
        keep_cls_token: Keep the CLS token at index 0 of every returned tensor (default True, the
            TerraTorch ViT convention; pair with ``ReshapeTokensToImage(remove_cls_token=True)``).
        with_projector: Also return the projected tokens (pixel shuffle 0.5 then the MLP to the language
            model width) of the last layer as an extra, final feature, without CLS token.
        image_size: Position-embedding grid size in pixels (inputs of other sizes are interpolated).
        allow_pickle: Read pickle checkpoints with ``weights_only=True`` when no safetensors exist.
        dtype: dtype the backbone's weights and computation use, whatever the checkpoint stores:
            ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``. Inputs are cast to it and features are
            returned in the input's dtype, so necks and decoders after it keep their own.
        **kwargs: Only keys TerraTorch's factory consumes itself (``padding``, ``patch_size``); anything
            else raises :class:`ConfigurationError` naming the closest valid argument.
    """

    family = "internvl"
    default_hub_id = "OpenGVLab/InternVL2_5-4B-MPO-hf"

    def __init__(
        self,
        preset: str = "full",
        weights: str | None = None,
        pretrained: bool = False,
        in_chans: int | None = None,
        bands: Sequence[object] | None = None,
        out_indices: Sequence[int] | None = None,
        keep_cls_token: bool = True,
        with_projector: bool = False,
        image_size: int | None = None,
        allow_pickle: bool = False,
        dtype: str | torch.dtype | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__()
        reject_unknown_kwargs(type(self).__name__, kwargs, argument_names(type(self).__init__))
        settings = choose_preset("InternVL", INTERNVL_PRESETS, preset)
        compute_dtype = resolve_dtype(dtype)
        self.preset = preset
        self.in_chans, self.bands = resolve_bands(in_chans, bands)
        if weights is None and pretrained:
            weights = self.default_hub_id
        checkpoint = None
        if weights is not None:
            checkpoint = resolve_weights_dir(weights)
            settings.update(self._settings_from_checkpoint(checkpoint))
        self.text_hidden_size = settings["text_hidden_size"]
        self.vision_config = vision_config_from_preset(settings, self.in_chans, image_size)
        if checkpoint is not None:
            with torch.device("meta"):
                planned = InternVLVisionModel(self.vision_config)
            check_shapes_on_meta(
                planned, checkpoint, ("model.vision_tower.", "vision_tower.", ""), ignore=(_PATCH_KERNEL,)
            )
        self.model = InternVLVisionModel(self.vision_config)
        self.projector: nn.Module | None = None
        if with_projector:
            self.projector = InternVLMultiModalProjector(projector_config(self.vision_config, self.text_hidden_size))
        if checkpoint is not None:
            self._load_checkpoint(checkpoint, allow_pickle)

        num_layers = self.vision_config.num_hidden_layers
        self.out_indices = resolve_out_indices(out_indices, num_layers)
        self.keep_cls_token = bool(keep_cls_token)
        self.has_cls_token = self.keep_cls_token
        self.patch_size = int(self.vision_config.patch_size[0])
        self.out_channels = [self.vision_config.hidden_size] * len(self.out_indices)
        if self.projector is not None:
            self.out_channels.append(self.text_hidden_size)
        self.with_projector = with_projector
        self.to(compute_dtype)

    # -- weights -----------------------------------------------------------------------------------------
    @staticmethod
    def _settings_from_checkpoint(directory) -> dict:
        config = read_config(directory)
        refuse_remote_code(config, directory)
        model_type = config.get("model_type")
        if model_type == "internvl":
            vision = InternVLVisionConfig(**config.get("vision_config", {}))
            text_hidden = config.get("text_config", {}).get("hidden_size", 2048)
        elif model_type == "internvl_vision":
            vision = InternVLVisionConfig(**config)
            text_hidden = INTERNVL_PRESETS["full"]["text_hidden_size"]
        else:
            raise WeightsError(
                f"{directory} holds a {model_type!r} checkpoint; expected a native InternVL checkpoint "
                "(model_type 'internvl' or 'internvl_vision')."
            )
        keys = [k for k in INTERNVL_PRESETS["full"] if k != "text_hidden_size"]
        settings = {k: getattr(vision, k) for k in keys}
        settings["image_size"] = int(vision.image_size[0])
        settings["patch_size"] = int(vision.patch_size[0])
        settings["text_hidden_size"] = text_hidden
        return settings

    def _load_checkpoint(self, directory, allow_pickle: bool) -> None:
        prefix = find_prefix(directory, ("model.vision_tower.", "vision_tower.", ""), "embeddings.", allow_pickle)
        tower = load_tensors(directory, (prefix,), allow_pickle)
        patch_key = _PATCH_KERNEL
        rgb_kernel = patch_key in tower and tower[patch_key].shape[1] == 3
        if rgb_kernel and (self.in_chans != 3 or self.bands is not None):
            # named bands are mapped by name even when there are three of them (BLUE, GREEN, RED -> reordered)
            tower[patch_key] = adapt_patch_weight(tower[patch_key], self.in_chans, self.bands)
        load_strict(self.model, tower, directory, "vision tower")
        if self.projector is not None:
            prefix = find_prefix(
                directory, ("model.multi_modal_projector.", "multi_modal_projector."), "linear_1.", allow_pickle
            )
            projector = load_tensors(directory, (prefix,), allow_pickle)
            load_strict(self.projector, projector, directory, "projector")

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, **kwargs: object) -> list[torch.Tensor]:
        """Return the tokens of each layer in ``out_indices`` (and the projected tokens if enabled).

        Args:
            x: ``[B, in_chans, H, W]``, H and W multiples of ``patch_size``.
            **kwargs: Other batch keys TerraTorch passes (ignored).

        Returns:
            A list of ``[B, 1 + N, C]`` tensors (``[B, N, C]`` without CLS), N = (H / 14) * (W / 14); with the
            projector, a last ``[B, N / 4, text_hidden_size]`` tensor.
        """
        self.check_input(x)
        rows, cols = self.grid_size(x.shape[-2], x.shape[-1])
        if self.projector is not None and (rows % 2 or cols % 2):
            raise InputError(
                f"with_projector needs an even token grid, got {rows}x{cols} patches for a "
                f"{x.shape[-2]}x{x.shape[-1]} image; use sides that are multiples of {2 * self.patch_size} px."
            )
        input_dtype = x.dtype
        x = x.to(self.model.embeddings.patch_embeddings.projection.weight.dtype)  # transformers 4.x does not cast
        hidden = first_tensor(self.model.embeddings(x))
        features = []
        last = max(self.out_indices) if self.projector is None else self.vision_config.num_hidden_layers - 1
        for index, layer in enumerate(self.model.encoder.layer[: last + 1]):
            hidden = first_tensor(layer(hidden))
            if index in self.out_indices:
                features.append(hidden if self.keep_cls_token else hidden[:, 1:])
        order = sorted(self.out_indices)
        features = [features[order.index(i)] for i in self.out_indices]
        if self.projector is not None:
            grid = hidden[:, 1:].reshape(hidden.shape[0], rows, cols, -1)
            shuffled = pixel_shuffle(grid)
            features.append(self.projector(shuffled.reshape(hidden.shape[0], -1, shuffled.shape[-1])))
        return [feature.to(input_dtype) for feature in features]


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
