"""EarthMind (InternVL2.5-4B + SAR/optical fusion) as a TerraTorch backbone, from the native classes.

EarthMind passes its SAR image and its optical image through the same InternViT-300M tower and the same
projector (pixel shuffle 0.5, then the MLP to the language model width, 2048) and hands both projected
token sequences to the language model, SAR first (:mod:`earthmind_compat.backbones.fusion`:
``fusion="concat"``, the release's inference, by default; ``fusion="gate"`` for its training-time gating).
This backbone rebuilds the image side from ``transformers``' ``InternVLVisionModel`` and
``InternVLMultiModalProjector``, loads the released checkpoint through :mod:`earthmind_compat.backbones.loader`,
and returns TerraTorch features:

* one feature per layer in ``out_indices``: the tower's tokens of every modality, side by side on the
  channel axis, ``[B, N, n_modalities * hidden]`` (SAR channels first);
* with ``language_layers=k``, the fused projected tokens, in the language model's order (all SAR tokens, then
  all optical ones), run through the first k decoder layers of EarthMind's language model (Qwen2.5-3B with its
  LoRA merged; :mod:`~earthmind_compat.backbones.language`); a chosen language layer's output is laid back out
  per position like the projected feature below, ``[B, N / 4, n_modalities * 2048]``;
* with ``with_projector=True``, a last feature with the fused projected tokens, ``[B, N / 4, 2 * 2048]``:
  per 2x2 patch block, the SAR token and the optical token side by side (gated with ``fusion="gate"``). The
  language model reads the same values as a sequence, all SAR tokens then all optical ones
  (:meth:`EarthMindOutput.sequence`, :func:`~earthmind_compat.backbones.fusion.sequence_from_grid`).

With one modality (or without ``modalities``) it is EarthMind's single-image path: nothing to fuse, and the
projected feature is the projected tokens of that modality.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import InternVLVisionModel
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector, InternVLVisionPatchEmbeddings

from earthmind_compat.arguments import resolve_dtype
from earthmind_compat.backbones.base import BackboneSpec, TokenBackbone
from earthmind_compat.backbones.fusion import (
    DEFAULT_FUSION,
    ConcatFusion,
    CrossModalGate,
    FusionOutput,
    build_fusion,
    resolve_fusion,
)
from earthmind_compat.backbones.internvl import (
    INTERNVIT_LORA_TARGETS,
    INTERNVL_PRESETS,
    check_projector_grid,
    checkpoint_parts,
    choose_layers,
    feature_merge_factors,
    language_depth,
    language_keys,
    load_language,
    projector_config,
    run_tower,
    vision_config_from_preset,
)
from earthmind_compat.backbones.language import (
    LanguageLayersMixin,
    build_language_model,
    check_language_attention,
    check_language_layers,
    run_language_layers,
)
from earthmind_compat.backbones.loader import (
    CHECKPOINT_LAYOUTS,
    GATE,
    LANGUAGE,
    PROJECTOR,
    VISION_TOWER,
    LoadedCheckpoint,
    load_checkpoint,
    load_strict,
)
from earthmind_compat.backbones.modalities import ModalityLayout, resolve_modalities
from earthmind_compat.bands import adapt_patch_weight
from earthmind_compat.compat import first_tensor
from earthmind_compat.errors import ConfigurationError, WeightsError, unknown_name

#: ``tiny`` for tests; ``full`` is EarthMind-4B's image side: InternViT-300M-448px-V2.5 and a projector to
#: Qwen2.5-3B's width 2048 (``local_query`` has the same width).
EARTHMIND_PRESETS: dict[str, dict] = {"tiny": dict(INTERNVL_PRESETS["tiny"]), "full": dict(INTERNVL_PRESETS["full"])}

#: EarthMind's releases by name (``release=``), all by its publisher in the ``sa2va_chat`` layout.
#: ``EarthMind-4B`` is the release of the paper and repository (the default). ``EarthMind4B_multi`` is the
#: publisher's multi-sensor release: the EarthMind-Bench (SAR + optical pairs) evaluation code of the authors
#: loads a retrained multi-sensor checkpoint through ``predict_forward_multi``; for SAR + optical inputs it is
#: the release to try. Its tensors could not be inspected here (no hub access): the strict key map refuses any
#: tensor it does not know, by name, rather than loading it partly.
EARTHMIND_RELEASES: dict[str, str] = {
    "EarthMind-4B": "sy1998/EarthMind-4B",
    "EarthMind4B_multi": "sy1998/EarthMind4B_multi",
}


def earthmind_checkpoint_parts(settings: dict, parts: Collection[str]) -> dict[str, torch.nn.Module]:
    """EarthMind's parts as a checkpoint holds them: InternVL's tower and projector, and the gate queries."""
    out = checkpoint_parts(settings, parts)
    if GATE in parts:
        out[GATE] = CrossModalGate(settings["text_hidden_size"])
    return out


@dataclass
class EarthMindOutput:
    """Everything one forward pass computes, before it is flattened into TerraTorch features.

    Attributes:
        layers: Per modality, the tokens of each layer in ``out_indices`` (with CLS if ``keep_cls_token``).
        projected: Per modality, the projected tokens ``[B, N / 4, text_hidden]`` before fusion (or ``None``).
        fusion: The fused tokens (and gates with ``fusion="gate"``) when two modalities meet at the projector
            (else ``None``).
        language: The chosen language layers' outputs as the language model computes them, on the sequence
            of :meth:`sequence` (``{language layer: [B, n_modalities * N / 4, text_hidden]}``).
    """

    layers: dict[str, list[torch.Tensor]]
    projected: dict[str, torch.Tensor] | None
    fusion: FusionOutput | None
    language: dict[int, torch.Tensor] = field(default_factory=dict)

    def sequence(self) -> torch.Tensor | None:
        """The image tokens as EarthMind's language model reads them (``None`` without the projector)."""
        if self.fusion is not None:
            return self.fusion.sequence()
        if self.projected is not None:
            return next(iter(self.projected.values()))
        return None


class EarthMindBackbone(LanguageLayersMixin, TokenBackbone):
    """EarthMind's image side: shared InternViT tower, projector and the fusion of SAR and optical tokens.

    Args:
        preset: ``"tiny"`` (tests) or ``"full"`` (EarthMind-4B dimensions, random init).
        weights: Local directory (or hub id) of a checkpoint in any InternVL-family layout
            (:data:`~earthmind_compat.backbones.loader.LAYOUTS`), normally EarthMind's release (``model_type``
            ``sa2va_chat``, safetensors). A remote config is read as data and its tensors renamed by
            :mod:`~earthmind_compat.backbones.convert`; no remote code is run. InternVL2.5-4B's checkpoints
            (EarthMind's tower is InternVL2.5-4B's, frozen in its training) load too, without the gate queries.
        pretrained: With ``weights`` unset, True loads the published release named by ``release``.
        release: Which EarthMind release ``pretrained=True`` loads (:data:`EARTHMIND_RELEASES`):
            ``"EarthMind-4B"`` (default, ``sy1998/EarthMind-4B``) or ``"EarthMind4B_multi"`` (the publisher's
            multi-sensor release, ``sy1998/EarthMind4B_multi``, for SAR + optical pairs).
        in_chans: Channels of a stacked input tensor (must equal the modalities' total if both are given).
        bands: Band names of a stacked input tensor, in order (see ``modalities``).
        modalities: ``{name: band names or band count}``, main (SAR) modality first, optical second, e.g.
            ``{"S1GRD": ["VV", "VH"], "S2L2A": ["BLUE", "GREEN", "RED"]}``. ``forward`` then takes a dict with
            these keys, or a stacked tensor that is split by band name (or by position). One entry, or
            ``None`` (then ``in_chans`` / ``bands`` describe the single sensor), is the single-sensor path.
        out_indices: Layers whose tokens are returned, over the stack of the vision tower's layers (0..V-1) followed
            by the ``language_layers`` language layers (V..V+k-1); negative indices count from the end of that
            stack (default: four spread over the stack's depth).
        language_layers: Run the fused projected tokens (SAR then optical, as the release's inference hands
            them to its language model) through the first k decoder layers of EarthMind's language model
            (Qwen2.5-3B, LoRA merged, 36 layers), 0..its depth (default 0: the vision side only).
        language_attention: ``"bidirectional"`` (default) or ``"causal"`` attention over the image tokens.
        keep_cls_token: Keep each modality's CLS token at index 0 of the layer features (default False, so
            every feature, projected ones included, is a plain token grid).
        with_projector: Also return the fused projected tokens as a last feature (the tokens EarthMind feeds
            its language model, laid out per position). Needs an even token grid.
        fusion: How two modalities' projected tokens are combined: ``"concat"`` (default; the release's
            inference, ``generate_multi``: SAR and optical tokens as they are, SAR first) or ``"gate"`` (the
            training class's sigmoid gates from ``local_query``; opt-in, needs two modalities and
            ``with_projector=True``; the released queries are probably an untrained random draw, see
            :mod:`~earthmind_compat.backbones.fusion`). Checkpoints of either mode load into the other.
        image_size: Position-embedding grid size in pixels (other input sizes are interpolated).
        allow_pickle: Read pickle checkpoints with ``weights_only=True`` when no safetensors exist.
        dtype: dtype the backbone's weights and computation use, whatever the checkpoint stores:
            ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``. Inputs are cast to it and features are
            returned in the input's dtype, so necks and decoders after it keep their own.
        **kwargs: Only keys TerraTorch's factory consumes itself (``padding``, ``patch_size``).

    Pretrained patch kernels for other band sets: every modality starts from the released RGB kernel by the
    rule of :mod:`earthmind_compat.bands` (RED/GREEN/BLUE keep their kernels, other named bands get the mean,
    scaled by ``3 / n_bands``; three unnamed bands keep the kernel as it is, as EarthMind fed its 3-channel
    SAR and optical renderings). A single named SAR band (e.g. ``["VV"]``) thus equals a grey image
    repeated over R, G and B.
    """

    spec = BackboneSpec(
        name="earthmind_v1",
        family="earthmind",
        summary="EarthMind-4B's image side: InternViT, projector and SAR/optical fusion",
        presets=EARTHMIND_PRESETS,
        input_sizes={"tiny": 56, "full": 448},
        lora_targets=INTERNVIT_LORA_TARGETS,
        hub_id=EARTHMIND_RELEASES["EarthMind-4B"],
        checkpoint_layouts=CHECKPOINT_LAYOUTS,
        cls_token=False,
    )

    def __init__(
        self,
        preset: str = "full",
        weights: str | None = None,
        pretrained: bool = False,
        release: str = "EarthMind-4B",
        in_chans: int | None = None,
        bands: Sequence[object] | None = None,
        modalities: Mapping[str, object] | None = None,
        out_indices: Sequence[int] | None = None,
        language_layers: int = 0,
        language_attention: str = "bidirectional",
        keep_cls_token: bool = False,
        with_projector: bool = False,
        fusion: str = DEFAULT_FUSION,
        image_size: int | None = None,
        allow_pickle: bool = False,
        dtype: str | torch.dtype | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(preset, kwargs)
        settings = self.preset_settings()
        compute_dtype = resolve_dtype(dtype)
        self.layout: ModalityLayout = resolve_modalities(modalities, in_chans, bands)
        self.in_chans, self.bands = self.layout.in_chans, self.layout.bands
        self.fusion_mode = resolve_fusion(fusion)
        self.language_attention = check_language_attention(language_attention)
        check_language_layers(language_layers)
        projects = bool(with_projector or language_layers)
        if self.fusion_mode == "gate" and not (projects and len(self.layout.modalities) == 2):
            raise ConfigurationError(
                "fusion='gate' gates the projected tokens of two modalities against each other, so it needs "
                "with_projector=True and two modalities (language_layers >= 1 also runs the projector; e.g. "
                "modalities={'S1GRD': ['VV', 'VH'], 'S2L2A': ['BLUE', 'GREEN', 'RED']}); use the default "
                "fusion='concat' otherwise."
            )
        if projects and keep_cls_token:
            raise ConfigurationError(
                "with_projector=True and language_layers add tokens on the merged grid, which have no CLS token, so "
                "keep_cls_token=True would give features that disagree about it (TerraTorch's ReshapeTokensToImage "
                "removes it from all or none). Use keep_cls_token=False."
            )
        if release not in EARTHMIND_RELEASES:
            raise unknown_name("EarthMind release", release, EARTHMIND_RELEASES)
        self.release = release
        weights = EARTHMIND_RELEASES[release] if weights is None and pretrained else weights
        checkpoint: LoadedCheckpoint | None = None
        self.projector_layer: int | None = None
        if weights is not None:
            parts = [VISION_TOWER]
            if projects:
                parts += [PROJECTOR, GATE] if len(self.layout.modalities) > 1 else [PROJECTOR]
            parts += [LANGUAGE] if language_layers else []
            select = language_keys(language_layers) if language_layers else None
            checkpoint = load_checkpoint(
                weights, settings, earthmind_checkpoint_parts, parts, allow_pickle, select=select
            )
            settings = checkpoint.settings
            self.projector_layer = checkpoint.projector_layer
        if language_layers:  # against the checkpoint's language model when one is loaded, else the preset's
            check_language_layers(language_layers, language_depth(settings, type(self).__name__))

        self.text_hidden_size = settings["text_hidden_size"]
        main, *others = self.layout.modalities
        self.vision_config = vision_config_from_preset(settings, main.channels, image_size)
        self.model = InternVLVisionModel(self.vision_config)
        self.aux_patch_embeddings: InternVLVisionPatchEmbeddings | None = None
        if others:
            aux_config = copy.deepcopy(self.vision_config)
            aux_config.num_channels = others[0].channels
            self.aux_patch_embeddings = InternVLVisionPatchEmbeddings(aux_config)
        self.projector: InternVLMultiModalProjector | None = None
        # ``gate`` holds ``local_query`` in both fusion modes (a buffer with "concat"), one state-dict key for both
        self.gate: ConcatFusion | CrossModalGate | None = None
        if projects:
            self.projector = InternVLMultiModalProjector(projector_config(self.vision_config, self.text_hidden_size))
            if others:
                self.gate = build_fusion(self.fusion_mode, self.text_hidden_size)
        self.with_projector = bool(with_projector)
        self.language_layers = language_layers
        self.language_model = build_language_model(settings["language"], language_layers) if language_layers else None
        for layer in self.language_model.layers if self.language_model is not None else ():
            layer.token_scale = len(self.layout.modalities) / 4  # tokens per image relative to the tower (planner)

        num_layers = self.vision_config.num_hidden_layers
        if self.projector_layer is None:
            self.projector_layer = num_layers - 1
        self.layers = choose_layers(out_indices, num_layers, language_layers)
        self.out_indices = self.layers.out_indices
        self.keep_cls_token = bool(keep_cls_token)
        self.has_cls_token = self.keep_cls_token
        self.patch_size = int(self.vision_config.patch_size[0])
        count = len(self.layout.modalities)
        self.out_channels = [
            (self.vision_config.hidden_size if i < num_layers else self.text_hidden_size) * count
            for i in self.out_indices
        ]
        if with_projector:
            self.out_channels.append(self.text_hidden_size * len(self.layout.modalities))
        self.merge_factors = feature_merge_factors(self.out_indices, num_layers, with_projector)
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
        self.to(compute_dtype)

    # -- weights -----------------------------------------------------------------------------------------
    def _load_checkpoint(self, checkpoint: LoadedCheckpoint) -> None:
        tower = dict(checkpoint.parts[VISION_TOWER])
        kernel_key = "embeddings.patch_embeddings.projection.weight"
        bias_key = "embeddings.patch_embeddings.projection.bias"
        released = tower[kernel_key]
        main, *others = self.layout.modalities
        tower[kernel_key] = self._kernel_for(released, main)
        load_strict(self.model, tower, checkpoint.directory, "vision tower")
        if self.aux_patch_embeddings is not None:
            aux = {"projection.weight": self._kernel_for(released, others[0]), "projection.bias": tower[bias_key]}
            load_strict(self.aux_patch_embeddings, aux, checkpoint.directory, f"{others[0].name} patch embedding")
        if self.projector is not None:
            load_strict(self.projector, checkpoint.parts[PROJECTOR], checkpoint.directory, "projector")
        if self.gate is not None:
            load_strict(self.gate, checkpoint.parts[GATE], checkpoint.directory, "cross-modal gate")
        if self.language_model is not None:
            load_language(self.language_model, checkpoint)

    @staticmethod
    def _kernel_for(released: torch.Tensor, modality) -> torch.Tensor:
        if released.shape[1] == modality.channels and modality.bands is None:
            return released.clone()
        if released.shape[1] != 3:
            raise WeightsError(
                f"The released patch kernel has {released.shape[1]} channels; modality {modality.name!r} needs "
                f"{modality.channels} and only 3-channel (RGB) kernels can be adapted."
            )
        return adapt_patch_weight(released, modality.channels, modality.bands)

    # -- forward -----------------------------------------------------------------------------------------
    def split_input(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Turn a dict of modalities or a stacked tensor into checked ``{modality: [B, C, H, W]}``.

        Raises:
            InputError: for a missing or unexpected modality, or a tensor of the wrong shape or kind.
        """
        if isinstance(x, Mapping):
            return self.layout.check_dict(x, self.patch_size, self.weight_device())
        self.check_input(x)
        return self.layout.split(x)

    def _embed(self, name: str, x: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.embeddings
        x = x.to(embeddings.patch_embeddings.projection.weight.dtype)  # transformers 4.x does not cast
        if name == self.layout.modalities[0].name:
            return first_tensor(embeddings(x))
        tokens = first_tensor(self.aux_patch_embeddings(x))
        tokens = torch.cat((embeddings.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1)
        tokens = tokens + embeddings.interpolate_pos_encoding(tokens, x.shape[-2], x.shape[-1])
        return embeddings.dropout(tokens)

    def forward_modalities(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> EarthMindOutput:
        """Run the tower on every modality (one batch), then the projector and the fusion.

        Args:
            x: A dict ``{modality: [B, C_m, H, W]}`` or a stacked ``[B, in_chans, H, W]`` tensor.

        Returns:
            The per-modality layer tokens, projected tokens and fusion (see :class:`EarthMindOutput`).
        """
        inputs = self.split_input(x)
        names = self.layout.names
        height, width = inputs[names[0]].shape[-2:]
        rows, cols = self.grid_size(height, width)
        if self.projector is not None:
            check_projector_grid(rows, cols, height, width, self.patch_size)
        batch = inputs[names[0]].shape[0]
        hidden = torch.cat([self._embed(name, inputs[name]) for name in names], dim=0)
        tower, tokens = run_tower(self, hidden, (rows, cols))

        def per_modality(stacked: torch.Tensor) -> dict[str, torch.Tensor]:
            return {name: stacked[k * batch : (k + 1) * batch] for k, name in enumerate(names)}

        split = [per_modality(layer) for layer in tower]
        layers = {name: [layer[name] for layer in split] for name in names}
        projected = fusion = None
        if tokens is not None:
            projected = per_modality(tokens)
            if self.gate is not None:
                fusion = self.gate(projected[names[0]], projected[names[1]])
        output = EarthMindOutput(layers=layers, projected=projected, fusion=fusion)
        if self.language_model is not None:
            output.language = run_language_layers(
                self.language_model, output.sequence(), self.layers.language, self.language_attention
            )
        return output

    def features(self, output: EarthMindOutput) -> list[torch.Tensor]:
        """Flatten an :class:`EarthMindOutput` into the TerraTorch feature list (see the module docstring)."""
        names = self.layout.names
        vision = [torch.cat([output.layers[n][i] for n in names], dim=-1) for i in range(len(self.layers.vision))]
        # the language model's sequence (per modality, one block of tokens) laid back out per position
        language = {i: torch.cat(seq.chunk(len(names), dim=1), dim=-1) for i, seq in output.language.items()}
        features = self.layers.gather(vision, language)
        if not self.with_projector:
            return features
        if output.fusion is not None:
            features.append(output.fusion.grid())
        elif output.projected is not None:
            features.append(output.projected[names[0]])
        return features

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor], **kwargs: object) -> list[torch.Tensor]:
        """Return one token tensor per layer in ``out_indices`` (and the fused projected tokens if enabled).

        Args:
            x: A dict ``{modality: [B, C_m, H, W]}`` or a stacked ``[B, in_chans, H, W]`` tensor; H and W
                multiples of ``patch_size`` (of twice it with the projector), equal for all modalities.
            **kwargs: Other batch keys TerraTorch passes (ignored).

        Returns:
            ``[B, N, n_modalities * hidden]`` per layer (``1 + N`` tokens with ``keep_cls_token``), then with the
            projector ``[B, N / 4, n_modalities * text_hidden]``; N = (H / 14) * (W / 14).
        """
        first = next(iter(x.values())) if isinstance(x, Mapping) else x
        features = self.features(self.forward_modalities(x))
        return [feature.to(first.dtype) if isinstance(first, torch.Tensor) else feature for feature in features]
