"""InternVL2.5 vision tower (InternViT) as a TerraTorch backbone, from the native transformers classes."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import InternVLConfig, InternVLVisionConfig, InternVLVisionModel, Qwen2Config
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

from earthmind_compat.arguments import resolve_dtype
from earthmind_compat.backbones.base import BackboneSpec, TokenBackbone, resolve_out_indices
from earthmind_compat.backbones.language import (
    QWEN25_3B,
    TINY_QWEN2,
    LanguageLayersMixin,
    build_language_model,
    check_language_attention,
    check_language_layers,
    language_config,
    run_language_layers,
)
from earthmind_compat.backbones.loader import (
    CHECKPOINT_LAYOUTS,
    LANGUAGE,
    PROJECTOR,
    VISION_TOWER,
    LoadedCheckpoint,
    load_checkpoint,
    load_strict,
)
from earthmind_compat.bands import adapt_patch_weight, resolve_bands
from earthmind_compat.compat import first_tensor
from earthmind_compat.errors import ConfigurationError, InputError

#: Vision-tower presets. ``full`` is InternViT-300M-448px-V2.5 as used by InternVL2.5-1B/2B/4B/8B;
#: ``internvit_6b`` is InternViT-6B-448px-V2.5 of InternVL2.5-26B/38B/78B. ``text_hidden_size`` is the
#: width of the language model the projector feeds (Qwen2.5-3B for InternVL2.5-4B; for the 6B tower the
#: projector is sized for InternVL2.5-38B's Qwen2.5-32B — load a checkpoint to get another width). ``language``
#: is that language model's config (:mod:`~earthmind_compat.backbones.language`; ``None``: no preset for it).
_INTERNVIT_300M = {
    "patch_size": 14,
    "attention_bias": True,
    "use_qk_norm": False,
    "norm_type": "layer_norm",
    "layer_scale_init_value": 0.1,
    "use_mean_pooling": True,
}
INTERNVL_PRESETS: dict[str, dict] = {
    "tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "image_size": 56,
        **_INTERNVIT_300M,
        "text_hidden_size": 64,
        "language": TINY_QWEN2,
    },
    "full": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "image_size": 448,
        **_INTERNVIT_300M,
        "text_hidden_size": 2048,
        "language": QWEN25_3B,
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
        "language": None,
    },
}

#: The released checkpoint ``pretrained=True`` loads, per preset (``full``: InternVL2.5-4B's own release, remote
#: layout; ``internvit_6b``: the standalone InternViT-6B-448px-V2.5, the tower of InternVL2.5-26B/38B/78B).
INTERNVL_HUB_IDS: dict[str, str] = {
    "full": "OpenGVLab/InternVL2_5-4B",
    "internvit_6b": "OpenGVLab/InternViT-6B-448px-V2_5",
}

#: LoRA targets of the InternViT tower: attention projections and the MLP.
INTERNVIT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2")

#: State-dict key of the patch-embedding kernel (adapted to the input bands, so its shape may differ).
_PATCH_KERNEL = "embeddings.patch_embeddings.projection.weight"

#: Pixel-shuffle factor of InternVL2.5's projector (every 2x2 block of tokens becomes one token).
DOWNSAMPLE_RATIO = 0.5


#: Patches per side that one projected token covers (the inverse of :data:`DOWNSAMPLE_RATIO`).
PROJECTED_MERGE = round(1 / DOWNSAMPLE_RATIO)


def feature_merge_factors(out_indices: Sequence[int], tower_depth: int, with_projector: bool) -> list[int]:
    """Patches per side one token covers, per returned feature: 1 on tower layers, 2 after the projector.

    Args:
        out_indices: The chosen layers; indices from ``tower_depth`` on are language layers (on the merged grid).
        tower_depth: Number of vision-tower layers.
        with_projector: Whether the projector's output is appended as the last feature.
    """
    factors = [1 if index < tower_depth else PROJECTED_MERGE for index in out_indices]
    return factors + ([PROJECTED_MERGE] if with_projector else [])


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
    settings = {k: v for k, v in preset.items() if k not in ("text_hidden_size", "num_channels", "language")}
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


def checkpoint_parts(settings: dict, parts: Collection[str]) -> dict[str, nn.Module]:
    """The InternVL parts a checkpoint holds, built from its settings as it stores them (its patch kernel's bands).

    The part builder of :func:`~earthmind_compat.backbones.loader.load_checkpoint` (call it on the meta device).
    """
    vision = vision_config_from_preset(settings, int(settings.get("num_channels", 3)), None)
    out: dict[str, nn.Module] = {VISION_TOWER: InternVLVisionModel(vision)}
    if PROJECTOR in parts:
        out[PROJECTOR] = InternVLMultiModalProjector(projector_config(vision, settings["text_hidden_size"]))
    if LANGUAGE in parts:  # every layer the checkpoint holds, so that each is checked (only the first k are read)
        language = settings["language"]
        out[LANGUAGE] = build_language_model(language, int(language_config(language).num_hidden_layers))
    return out


def language_depth(settings: dict, owner: str) -> int:
    """Decoder layers of the language model ``settings`` describe.

    Raises:
        ConfigurationError: when the preset has no language model and no checkpoint gave one.
    """
    language = settings.get("language")
    if language is None:
        raise ConfigurationError(
            f"{owner}: this preset has no language model configuration; load a checkpoint that holds one "
            "(weights=...) or use preset 'full' / 'tiny' for language_layers."
        )
    return int(language_config(language).num_hidden_layers)


@dataclass(frozen=True)
class LayerChoice:
    """Which layers a backbone returns, over its whole stack: vision layers 0..V-1, then language layers V..V+k-1.

    Attributes:
        out_indices: The chosen layers in the returned order (non-negative, over the whole stack).
        vision_layers: V, the vision tower's depth.
        language_layers: k, the language layers run.
    """

    out_indices: list[int]
    vision_layers: int
    language_layers: int

    @property
    def vision(self) -> list[int]:
        """Chosen vision layers, in order."""
        return [i for i in self.out_indices if i < self.vision_layers]

    @property
    def language(self) -> list[int]:
        """Chosen language layers (0-based within the language model), in order."""
        return [i - self.vision_layers for i in self.out_indices if i >= self.vision_layers]

    def gather(self, vision: Sequence[torch.Tensor], language: Mapping[int, torch.Tensor]) -> list[torch.Tensor]:
        """The features in ``out_indices`` order.

        Args:
            vision: The chosen vision layers' features, in :attr:`vision` order.
            language: ``{language layer: feature}`` of the chosen language layers.
        """
        by_vision = dict(zip(self.vision, vision, strict=True))
        return [by_vision[i] if i < self.vision_layers else language[i - self.vision_layers] for i in self.out_indices]


def choose_layers(out_indices: Sequence[int] | None, vision_layers: int, language_layers: int) -> LayerChoice:
    """Resolve ``out_indices`` over the stack of vision then language layers (negative indices from its end).

    Raises:
        ConfigurationError: for an index outside the stack, a repeat or a non-integer.
    """
    indices = resolve_out_indices(out_indices, vision_layers + language_layers)
    return LayerChoice(indices, vision_layers, language_layers)


def language_keys(language_layers: int) -> Callable[[str], bool]:
    """The loader's key filter reading only the first ``language_layers`` decoder layers of the language model."""
    prefix = LANGUAGE + ".layers."

    def wanted(key: str) -> bool:
        if not key.startswith(prefix):
            return True
        return int(key[len(prefix) :].split(".", 1)[0]) < language_layers

    return wanted


def load_language(module: nn.Module, checkpoint: LoadedCheckpoint) -> None:
    """Load the first k decoder layers (k = the layers ``module`` holds) from ``checkpoint`` strictly."""
    load_strict(module, checkpoint.parts[LANGUAGE], checkpoint.directory, "language model")


def check_projector_grid(rows: int, cols: int, height: int, width: int, patch_size: int) -> None:
    """Raise :class:`InputError` unless the token grid can be pixel-shuffled (even rows and columns)."""
    if rows % 2 or cols % 2:
        raise InputError(
            f"with_projector needs an even token grid, got {rows}x{cols} patches for a {height}x{width} image; "
            f"use sides that are multiples of {2 * patch_size} px."
        )


def run_tower(
    backbone: TokenBackbone, hidden: torch.Tensor, grid: tuple[int, int]
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Run the InternViT layers of ``backbone`` on embedded tokens, up to the last layer anything needs.

    Shared by the backbones built on InternViT; reads their ``model`` (the ``InternVLVisionModel``),
    ``layers`` (their :class:`LayerChoice`), ``keep_cls_token``, ``projector`` (or ``None``) and
    ``projector_layer`` (the layer whose output the projector reads).

    Args:
        backbone: The backbone.
        hidden: Embedded tokens ``[B, 1 + N, C]`` (CLS first), as ``model.embeddings`` returns them.
        grid: The token grid ``(rows, cols)``.

    Returns:
        The tokens of each chosen vision layer, in that order (``[B, 1 + N, C]``, or ``[B, N, C]`` without
        CLS), and the projected tokens ``[B, N / 4, text_hidden]`` (pixel shuffle 0.5, then the projector) or
        ``None`` without projector.
    """
    projector = backbone.projector
    chosen = backbone.layers.vision
    wanted = set(chosen) | ({backbone.projector_layer} if projector is not None else set())
    collected: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(backbone.model.encoder.layer[: max(wanted) + 1]):
        hidden = first_tensor(layer(hidden))
        if index in wanted:
            collected[index] = hidden
    start = 0 if backbone.keep_cls_token else 1
    layers = [collected[i][:, start:] for i in chosen]
    if projector is None:
        return layers, None
    tokens = collected[backbone.projector_layer]
    shuffled = pixel_shuffle(tokens[:, 1:].reshape(tokens.shape[0], *grid, -1))
    return layers, projector(shuffled.reshape(tokens.shape[0], -1, shuffled.shape[-1]))


class InternVLBackbone(LanguageLayersMixin, TokenBackbone):
    """InternViT (the vision tower of InternVL2.5) returning per-layer tokens.

    Args:
        preset: ``"tiny"`` (tests), ``"full"`` (InternViT-300M, InternVL2.5-4B) or ``"internvit_6b"``.
        weights: Local directory or hub id of a checkpoint in any InternVL-family layout
            (:data:`~earthmind_compat.backbones.loader.LAYOUTS`): native ``InternVLForConditionalGeneration`` /
            ``InternVLModel`` / ``InternVLVisionModel`` (the ``-hf`` repositories), InternVL's release
            (``internvl_chat``), the standalone InternViT (``intern_vit_6b``) or EarthMind's release
            (``sa2va_chat``, whose tower is InternVL2.5-4B's); remote layouts are read as data.
        pretrained: With ``weights`` unset, True loads the published release of the preset
            (:data:`INTERNVL_HUB_IDS`: ``OpenGVLab/InternVL2_5-4B``, or ``OpenGVLab/InternViT-6B-448px-V2_5``).
        in_chans: Number of input bands (default 3, or ``len(bands)``).
        bands: Band names; RED/GREEN/BLUE reuse their pretrained kernels, others the RGB mean.
        out_indices: Layers whose outputs are returned, over the stack of the vision tower's layers (0..V-1)
            followed by the ``language_layers`` language layers (V..V+k-1); negative indices count from the end
            of that stack, so ``[-1]`` is the last language layer (default: four spread over the stack's depth).
        language_layers: Run the projected tokens through the first k decoder layers of the language model
            (InternVL2.5-4B: Qwen2.5-3B-Instruct, 36 layers; see :mod:`~earthmind_compat.backbones.language`),
            0..its depth (default 0: the vision tower only). Their features are ``[B, N / 4, 2048]`` tokens on the
            merged grid, without CLS token.
        language_attention: ``"bidirectional"`` (default; every image token sees every other) or ``"causal"``
            (as the language model reads them in a prompt).
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

    spec = BackboneSpec(
        name="internvl2_5_4b",
        family="internvl",
        summary="InternVL2.5-4B's vision tower (InternViT-300M-448px-V2.5)",
        presets=INTERNVL_PRESETS,
        input_sizes={"tiny": 56, "full": 448, "internvit_6b": 448},
        lora_targets=INTERNVIT_LORA_TARGETS,
        hub_id=INTERNVL_HUB_IDS["full"],
        checkpoint_layouts=CHECKPOINT_LAYOUTS,
        cls_token=True,
    )

    def __init__(
        self,
        preset: str = "full",
        weights: str | None = None,
        pretrained: bool = False,
        in_chans: int | None = None,
        bands: Sequence[object] | None = None,
        out_indices: Sequence[int] | None = None,
        language_layers: int = 0,
        language_attention: str = "bidirectional",
        keep_cls_token: bool = True,
        with_projector: bool = False,
        image_size: int | None = None,
        allow_pickle: bool = False,
        dtype: str | torch.dtype | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(preset, kwargs)
        settings = self.preset_settings()
        compute_dtype = resolve_dtype(dtype)
        self.in_chans, self.bands = resolve_bands(in_chans, bands)
        self.language_attention = check_language_attention(language_attention)
        check_language_layers(language_layers)
        weights = self.weights_source(weights, pretrained)
        checkpoint: LoadedCheckpoint | None = None
        if weights is not None:
            parts = (VISION_TOWER, PROJECTOR) if with_projector or language_layers else (VISION_TOWER,)
            parts += (LANGUAGE,) if language_layers else ()
            select = language_keys(language_layers) if language_layers else None
            checkpoint = load_checkpoint(weights, settings, checkpoint_parts, parts, allow_pickle, select=select)
            settings = checkpoint.settings
        if language_layers:  # against the checkpoint's language model when one is loaded, else the preset's
            check_language_layers(language_layers, language_depth(settings, type(self).__name__))
        self.text_hidden_size = settings["text_hidden_size"]
        self.vision_config = vision_config_from_preset(settings, self.in_chans, image_size)
        self.model = InternVLVisionModel(self.vision_config)
        self.projector: nn.Module | None = None
        if with_projector or language_layers:
            self.projector = InternVLMultiModalProjector(projector_config(self.vision_config, self.text_hidden_size))
        self.language_layers = language_layers
        self.language_model = build_language_model(settings["language"], language_layers) if language_layers else None
        for layer in self.language_model.layers if self.language_model is not None else ():
            layer.token_scale = 1 / 4  # tokens it reads per image, relative to the tower's (the memory planner)
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)

        num_layers = self.vision_config.num_hidden_layers
        self.layers = choose_layers(out_indices, num_layers, language_layers)
        self.out_indices = self.layers.out_indices
        self.projector_layer = checkpoint.projector_layer if checkpoint is not None else num_layers - 1
        self.keep_cls_token = bool(keep_cls_token)
        self.has_cls_token = self.keep_cls_token
        self.patch_size = int(self.vision_config.patch_size[0])
        self.out_channels = [
            self.vision_config.hidden_size if i < num_layers else self.text_hidden_size for i in self.out_indices
        ]
        if with_projector:
            self.out_channels.append(self.text_hidden_size)
        self.merge_factors = feature_merge_factors(self.out_indices, num_layers, with_projector)
        self.with_projector = with_projector
        self.to(compute_dtype)

    # -- weights -----------------------------------------------------------------------------------------
    def weights_source(self, weights: str | None, pretrained: bool) -> str | None:
        """``weights``, or with ``pretrained`` the release of this preset (:data:`INTERNVL_HUB_IDS`)."""
        return INTERNVL_HUB_IDS.get(self.preset, self.spec.hub_id) if weights is None and pretrained else weights

    def _load_checkpoint(self, checkpoint: LoadedCheckpoint) -> None:
        tower = dict(checkpoint.parts[VISION_TOWER])
        rgb_kernel = _PATCH_KERNEL in tower and tower[_PATCH_KERNEL].shape[1] == 3
        if rgb_kernel and (self.in_chans != 3 or self.bands is not None):
            # named bands are mapped by name even when there are three of them (BLUE, GREEN, RED -> reordered)
            tower[_PATCH_KERNEL] = adapt_patch_weight(tower[_PATCH_KERNEL], self.in_chans, self.bands)
        load_strict(self.model, tower, checkpoint.directory, "vision tower")
        if self.projector is not None:
            load_strict(self.projector, checkpoint.parts[PROJECTOR], checkpoint.directory, "projector")
        if self.language_model is not None:
            load_language(self.language_model, checkpoint)

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, **kwargs: object) -> list[torch.Tensor]:
        """Return the tokens of each layer in ``out_indices`` (and the projected tokens if enabled).

        Args:
            x: ``[B, in_chans, H, W]``, H and W multiples of ``patch_size``.
            **kwargs: Other batch keys TerraTorch passes (ignored).

        Returns:
            Per layer in ``out_indices``: a vision layer's ``[B, 1 + N, C]`` tokens (``[B, N, C]`` without CLS),
            N = (H / 14) * (W / 14), or a language layer's ``[B, N / 4, text_hidden_size]`` tokens; with the
            projector, a last ``[B, N / 4, text_hidden_size]`` tensor.
        """
        self.check_input(x)
        rows, cols = self.grid_size(x.shape[-2], x.shape[-1])
        if self.projector is not None:
            check_projector_grid(rows, cols, x.shape[-2], x.shape[-1], self.patch_size)
        embeddings = self.model.embeddings
        hidden = first_tensor(embeddings(x.to(embeddings.patch_embeddings.projection.weight.dtype)))  # 4.x: no cast
        vision, projected = run_tower(self, hidden, (rows, cols))
        language = {}
        if self.language_model is not None:
            chosen = self.layers.language
            language = run_language_layers(self.language_model, projected, chosen, self.language_attention)
        features = self.layers.gather(vision, language)
        if self.with_projector:
            features.append(projected)
        return [feature.to(x.dtype) for feature in features]
