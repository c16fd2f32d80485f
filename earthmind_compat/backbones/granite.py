"""Granite 4.0 Tiny (GraniteMoeHybrid: Mamba-2 + attention + MoE) as an image backbone.

The language model is fed patch embeddings through ``inputs_embeds``' path: a convolutional patch
embedding plus fixed 2-D sine-cosine positions (the model itself has none) produce one token per
16 x 16 patch in raster order. Attention layers run bidirectionally (``is_causal`` off, no mask). Mamba
layers are causal by nature; with ``bidirectional_mamba=True`` each Mamba layer also runs on the reversed
sequence and the two residual outputs are averaged, so every token sees the whole image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import GraniteMoeHybridConfig, GraniteMoeHybridModel

from earthmind_compat.arguments import resolve_dtype
from earthmind_compat.backbones.base import BackboneSpec, CheckpointLayout, TokenBackbone, resolve_out_indices
from earthmind_compat.bands import resolve_bands
from earthmind_compat.compat import first_tensor
from earthmind_compat.errors import WeightsError
from earthmind_compat.weights import (
    check_shapes_on_meta,
    read_config,
    refuse_remote_code,
    resolve_weights_dir,
    safetensors_files,
)

_TINY_LAYERS = ["mamba", "attention", "mamba", "attention"]
#: Granite 4.0 H Tiny: attention at layers 5, 15, 25, 35 of 40, Mamba-2 elsewhere.
_FULL_LAYERS = ["attention" if i in (5, 15, 25, 35) else "mamba" for i in range(40)]

GRANITE_PRESETS: dict[str, dict] = {
    "tiny": {
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 16,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "shared_intermediate_size": 32,
        "layer_types": _TINY_LAYERS,
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_d_state": 8,
        "mamba_n_groups": 1,
        "mamba_expand": 2,
        "mamba_d_conv": 4,
        "mamba_chunk_size": 16,
        "position_embedding_type": "nope",
        "rms_norm_eps": 1e-5,
        "patch_size": 16,
    },
    "full": {
        "vocab_size": 100352,
        "hidden_size": 1536,
        "intermediate_size": 512,
        "num_hidden_layers": 40,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "num_local_experts": 64,
        "num_experts_per_tok": 6,
        "shared_intermediate_size": 1024,
        "layer_types": _FULL_LAYERS,
        "mamba_n_heads": 48,
        "mamba_d_head": 64,
        "mamba_d_state": 128,
        "mamba_n_groups": 1,
        "mamba_expand": 2,
        "mamba_d_conv": 4,
        "mamba_chunk_size": 256,
        "position_embedding_type": "nope",
        "rms_norm_eps": 1e-5,
        "embedding_multiplier": 12.0,
        "attention_multiplier": 0.0078125,
        "residual_multiplier": 0.22,
        "logits_scaling": 6.0,
        "patch_size": 16,
    },
}


def sincos_positions(rows: int, cols: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings ``[rows * cols, dim]`` (half the channels per axis).

    Args:
        rows: Token rows.
        cols: Token columns.
        dim: Embedding width; uses ``dim // 4 * 4`` channels and pads the rest with zeros.
        device: Device of the result.
        dtype: Dtype of the result.
    """
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1)))
    grid_r, grid_c = torch.meshgrid(
        torch.arange(rows, device=device, dtype=torch.float32),
        torch.arange(cols, device=device, dtype=torch.float32),
        indexing="ij",
    )
    angles_r = grid_r.reshape(-1, 1) * freqs
    angles_c = grid_c.reshape(-1, 1) * freqs
    emb = torch.cat([angles_r.sin(), angles_r.cos(), angles_c.sin(), angles_c.cos()], dim=1)
    if emb.shape[1] < dim:
        emb = torch.nn.functional.pad(emb, (0, dim - emb.shape[1]))
    return emb.to(dtype=dtype) if dtype is not None else emb


class GraniteBackbone(TokenBackbone):
    """Granite 4.0 Tiny's hybrid Mamba/attention/MoE stack as an image encoder returning per-layer tokens.

    Args:
        preset: ``"tiny"`` (tests) or ``"full"`` (granite-4.0-h-tiny dimensions, 6.9 B parameters).
        weights: Local directory or hub id of a native ``granitemoehybrid`` checkpoint (the language model
            weights; the patch embedding is always newly initialised).
        pretrained: With ``weights`` unset, True means ``ibm-granite/granite-4.0-h-tiny``.
        in_chans: Number of input bands (default 3, or ``len(bands)``).
        bands: Band names (only their count matters: the patch embedding is new).
        out_indices: Layers whose outputs are returned (default: four spread over the depth).
        bidirectional_mamba: Also run every Mamba layer on the reversed token sequence (twice the Mamba cost).
        patch_size: Patch side in pixels (default 16).
        allow_pickle: Read pickle checkpoints with ``weights_only=True`` when no safetensors exist.
        dtype: dtype the backbone's weights and computation use, whatever the checkpoint stores:
            ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``. Inputs are cast to it and features are
            returned in the input's dtype, so necks and decoders after it keep their own.
        **kwargs: Only keys TerraTorch's factory consumes itself (``padding``, ``patch_size``); anything
            else raises :class:`ConfigurationError` naming the closest valid argument.

    The token-embedding table of the language model is dropped (``model.embed_tokens`` is None): images
    enter through the patch embedding, so those 154 M parameters would never be used. The final RMSNorm
    is dropped too (``model.norm`` is None): features are the raw outputs of the selected layers, as for
    the InternVL tower.
    """

    spec = BackboneSpec(
        name="granite_4_tiny",
        family="granite",
        summary="Granite 4.0 H Tiny as an image encoder",
        presets=GRANITE_PRESETS,
        input_sizes={"tiny": 64, "full": 224},
        # attention projections, Mamba in/out projections and the shared MLP; the 64 routed experts per layer are
        # left out (LoRA on each would multiply adapters by 64; they are quantized instead)
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "input_linear", "output_linear"),
        hub_id="ibm-granite/granite-4.0-h-tiny",
        checkpoint_layouts=(
            CheckpointLayout(
                model_types=("granitemoehybrid",),
                prefixes={"language model": ("model.", "")},
                description="Granite 4.0 H models in the native transformers format",
            ),
        ),
        cls_token=False,
    )
    new_modules = ("patch_embed",)

    def __init__(
        self,
        preset: str = "full",
        weights: str | None = None,
        pretrained: bool = False,
        in_chans: int | None = None,
        bands: Sequence[object] | None = None,
        out_indices: Sequence[int] | None = None,
        bidirectional_mamba: bool = False,
        patch_size: int | None = None,
        allow_pickle: bool = False,
        dtype: str | torch.dtype | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(preset, kwargs)
        settings = self.preset_settings()
        compute_dtype = resolve_dtype(dtype)
        self.in_chans, self.bands = resolve_bands(in_chans, bands)
        self.patch_size = int(patch_size or settings.pop("patch_size"))
        settings.pop("patch_size", None)
        weights = self.weights_source(weights, pretrained)
        if weights is not None:
            self.model = self._from_checkpoint(weights, allow_pickle)
        else:
            self.model = GraniteMoeHybridModel(GraniteMoeHybridConfig(**settings))
        self.config = self.model.config
        self.model.embed_tokens = None
        self.model.norm = None
        for layer in self.model.layers:
            if getattr(layer, "self_attn", None) is not None:
                layer.self_attn.is_causal = False
        hidden = self.config.hidden_size
        self.patch_embed = nn.Conv2d(self.in_chans, hidden, kernel_size=self.patch_size, stride=self.patch_size)
        self.out_indices = resolve_out_indices(out_indices, self.config.num_hidden_layers)
        self.bidirectional_mamba = bool(bidirectional_mamba)
        self.has_cls_token = False
        self.out_channels = [hidden] * len(self.out_indices)
        self.merge_factors = [1] * len(self.out_indices)
        self.to(compute_dtype)  # a bf16 checkpoint loads as bf16; every part follows one dtype

    @classmethod
    def _from_checkpoint(cls, weights: str, allow_pickle: bool) -> GraniteMoeHybridModel:
        directory = resolve_weights_dir(weights)
        config = read_config(directory)
        refuse_remote_code(config, directory)
        (layout,) = cls.spec.checkpoint_layouts
        if config.get("model_type") not in layout.model_types:
            raise WeightsError(
                f"{directory} holds a {config.get('model_type')!r} checkpoint; expected "
                f"{' or '.join(map(repr, layout.model_types))} ({layout.description})."
            )
        if not list(directory.glob("*.safetensors")) and not allow_pickle:
            safetensors_files(directory, allow_pickle=False)  # raises the explanatory error
        try:
            planned_config = GraniteMoeHybridConfig.from_pretrained(str(directory))
        except Exception as exc:  # transformers validates configs with several exception types
            raise WeightsError(
                f"{directory}/config.json is not a valid Granite 4.0 config ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[-1]}). Use the config.json saved with the checkpoint."
            ) from None
        try:
            with torch.device("meta"):
                planned = GraniteMoeHybridModel(planned_config)
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            # e.g. transformers 4.x with neither ``layer_types`` nor ``layers_block_type``: no type per layer
            raise WeightsError(
                f"{directory}/config.json does not describe the model's layers ({type(exc).__name__} while building "
                f"it: {exc}), so it cannot say which blocks the checkpoint holds and which blocks the checkpoint "
                "does not hold. Use the config.json saved with the checkpoint (it needs num_hidden_layers and the "
                "per-layer types)."
            ) from None
        check_shapes_on_meta(planned, directory, layout.prefixes["language model"])  # before allocating anything
        del planned
        return GraniteMoeHybridModel.from_pretrained(
            str(directory), use_safetensors=not allow_pickle, trust_remote_code=False
        )

    def _layer_types(self) -> list[str]:
        types = getattr(self.config, "layers_block_type", None) or self.config.layer_types
        return ["mamba" if t in ("mamba", "linear_attention") else "attention" for t in types]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus 2-D positions, scaled as Granite scales token embeddings: ``[B, N, C]``."""
        tokens = self.patch_embed(x.to(self.patch_embed.weight.dtype))
        _, channels, rows, cols = tokens.shape
        tokens = tokens.flatten(2).transpose(1, 2)
        tokens = tokens + sincos_positions(rows, cols, channels, tokens.device, tokens.dtype)
        return tokens * float(self.config.embedding_multiplier or 1.0)

    def forward(self, x: torch.Tensor, **kwargs: object) -> list[torch.Tensor]:
        """Return the tokens ``[B, N, C]`` (N = (H / p) * (W / p), no CLS token) of each layer in ``out_indices``.

        Args:
            x: ``[B, in_chans, H, W]``, H and W multiples of ``patch_size``.
            **kwargs: Other batch keys TerraTorch passes (ignored).
        """
        self.check_input(x)
        hidden = self.embed(x)
        layer_types = self._layer_types()
        wanted = set(self.out_indices)
        collected: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.model.layers[: max(wanted) + 1]):
            if layer_types[index] == "attention":
                hidden = _run_layer(layer, hidden, is_causal=False)
            elif self.bidirectional_mamba:
                forward_pass = _run_layer(layer, hidden)
                backward_pass = _run_layer(layer, hidden.flip(1)).flip(1)
                hidden = 0.5 * (forward_pass + backward_pass)
            else:
                hidden = _run_layer(layer, hidden)
            if index in wanted:
                collected[index] = hidden
        return [collected[i].to(x.dtype) for i in self.out_indices]


def _run_layer(layer: nn.Module, hidden: torch.Tensor, **kwargs: object) -> torch.Tensor:
    # is_causal=False reaches the attention function as a keyword in transformers 4.x and 5.x alike (4.x's
    # SDPA path ignores the module's own is_causal flag, which is also switched off for 5.x and eager)
    return first_tensor(layer(hidden, attention_mask=None, position_embeddings=None, **kwargs))
