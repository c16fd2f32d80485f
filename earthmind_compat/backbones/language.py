"""The first k decoder layers of InternVL2.5-4B's / EarthMind-4B's language model, run over image tokens.

InternVL2.5-4B hands its projected image tokens (pixel shuffle 0.5, then ``mlp1``) to Qwen2.5-3B-Instruct;
EarthMind-4B hands the same kind of tokens, SAR then optical, to the same model with its LoRA merged. With
``language_layers=k`` the backbones run those tokens through the first k decoder layers of that language model,
built from ``transformers``' native ``Qwen2Model`` (never remote code), and return the outputs of chosen layers as
features on the merged token grid (Pang et al., ICLR 2024: frozen language-model layers strengthen visual encoders).

What is kept of the language model: its first k decoder layers and its rotary position embedding (positions
0..N-1 over the image tokens, as when the image is the start of the prompt). What is not: the token embedding
(images enter as projected tokens), the later layers, the final RMSNorm (features are the raw outputs of the
chosen layers, as for the vision tower's layers) and the LM head.

Attention over the image tokens is bidirectional by default (every token sees the whole image; no mask), or causal
as the language model reads them in a prompt (``language_attention="causal"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2Model
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from earthmind_compat.compat import call_decoder_layer
from earthmind_compat.errors import ConfigurationError, WeightsError

#: Attention modes over the image tokens: ``bidirectional`` (default) or ``causal``.
LANGUAGE_ATTENTION = ("bidirectional", "causal")

#: LoRA targets of a Qwen2 decoder layer: the attention projections and the gated MLP.
QWEN2_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Qwen2.5-3B-Instruct, the language model of InternVL2.5-4B and EarthMind-4B (its released ``config.json``).
QWEN25_3B: dict[str, object] = {
    "hidden_size": 2048,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "intermediate_size": 11008,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
}

#: A tiny Qwen2 for tests (width = the tiny preset's projector width, 64).
TINY_QWEN2: dict[str, object] = {
    **QWEN25_3B,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 16,
}

#: Config keys that never describe the decoder layers (the checkpoint's own bookkeeping).
_BOOKKEEPING = ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path", "torch_dtype")


class LanguageLayersMixin:
    """The blocks and LoRA targets of a vision tower followed by optional language layers.

    For a backbone with the tower's layers in ``self.model.encoder.layer`` and ``self.language_model`` (``None``
    without ``language_layers``). :func:`~earthmind_compat.optimize.families.find_blocks` reads ``block_lists``;
    LoRA adds ``extra_lora_targets``.
    """

    model: nn.Module
    language_model: Qwen2Model | None

    @property
    def extra_lora_targets(self) -> tuple[str, ...]:
        """LoRA targets of the language layers (:data:`QWEN2_LORA_TARGETS`), none without them."""
        return () if self.language_model is None else QWEN2_LORA_TARGETS

    @property
    def block_lists(self) -> tuple[nn.ModuleList, ...]:
        """The backbone's repeated blocks: the vision tower's layers, then the language layers it runs."""
        lists = (self.model.encoder.layer,)
        return lists if self.language_model is None else (*lists, self.language_model.layers)


def language_config(settings: Mapping[str, object]) -> Qwen2Config:
    """The native :class:`~transformers.Qwen2Config` of a language-model settings dictionary.

    Raises:
        WeightsError: for a language model that is not a Qwen2 model, or rotary scaling the layers cannot run.
    """
    fields = {k: v for k, v in settings.items() if k not in _BOOKKEEPING}
    model_type = settings.get("model_type", "qwen2")
    if model_type != "qwen2":
        raise WeightsError(
            f"The checkpoint's language model is {model_type!r}; language_layers runs Qwen2 language models "
            "(InternVL2.5-1B/2B/4B, EarthMind-4B). Use language_layers=0 for this checkpoint."
        )
    config = Qwen2Config(**fields)
    config.use_cache = False
    return config


def check_language_layers(language_layers: object, available: int | None = None) -> int:
    """Validate ``language_layers``: an integer, and in 0..``available`` (the language model's depth) if given.

    Raises:
        ConfigurationError: naming the valid range.
    """
    limit = "N (the language model's depth, 36 for Qwen2.5-3B)" if available is None else str(available)
    if isinstance(language_layers, bool) or not isinstance(language_layers, int):
        raise ConfigurationError(
            f"language_layers must be an integer in 0..{limit} (how many of the language model's first decoder "
            f"layers run over the image tokens; 0 runs none), got {language_layers!r}."
        )
    if language_layers < 0 or (available is not None and language_layers > available):
        raise ConfigurationError(
            f"language_layers={language_layers} is outside 0..{limit}: that many of the language model's first "
            "decoder layers run over the image tokens (0: none)."
        )
    return language_layers


def check_language_attention(mode: object) -> str:
    """Validate ``language_attention`` (``"bidirectional"`` or ``"causal"``).

    Raises:
        ConfigurationError: naming the choices.
    """
    if mode not in LANGUAGE_ATTENTION:
        raise ConfigurationError(
            f"language_attention must be one of {', '.join(map(repr, LANGUAGE_ATTENTION))}, got {mode!r}."
        )
    return str(mode)


def build_language_model(settings: Mapping[str, object], layers: int) -> Qwen2Model:
    """A native ``Qwen2Model`` with only its first ``layers`` decoder layers, no token embedding and no final norm.

    Args:
        settings: Qwen2 config fields (a preset's ``language`` entry, or the checkpoint's language config).
        layers: How many decoder layers to build (the first ones of the released model).
    """
    config = language_config(settings)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:layers]
    vocab = config.vocab_size
    config.vocab_size = 1  # the token embedding is dropped right away: do not allocate 151936 x 2048 for it
    model = Qwen2Model(config)
    config.vocab_size = vocab
    model.embed_tokens = None
    model.norm = None
    model.rotary_emb = None  # computed per call (:func:`rotary_embeddings`): no buffers to count, cast or save
    for layer in model.layers:
        layer.register_forward_pre_hook(_default_positions, with_kwargs=True)
    return model


def _default_positions(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """A decoder layer called alone (``layer(hidden)``, e.g. by the memory planner) runs at positions 0..N-1."""
    if kwargs.get("position_embeddings") is not None:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
    embeddings = rotary_embeddings(layer.self_attn.config, hidden, position_ids)
    return args, {**kwargs, "position_embeddings": embeddings, "is_causal": False}


def rotary_embeddings(config: Qwen2Config, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple:
    """The language model's rotary ``(cos, sin)`` at ``position_ids``, from its own ``Qwen2RotaryEmbedding``.

    Built per call (a few hundred frequencies) in float32 on ``hidden``'s device, so the backbone holds no buffer
    that a dtype cast would round.
    """
    return Qwen2RotaryEmbedding(config).to(hidden.device)(hidden, position_ids)


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive ``[1, 1, length, length]`` mask: token i attends to tokens 0..i."""
    blocked = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    mask = torch.zeros(length, length, dtype=dtype, device=device)
    return mask.masked_fill(blocked, torch.finfo(dtype).min)[None, None]


def run_language_layers(
    model: Qwen2Model, tokens: torch.Tensor, wanted: Sequence[int], attention: str = "bidirectional"
) -> dict[int, torch.Tensor]:
    """Run image tokens through the decoder layers of ``model`` up to the last one in ``wanted``.

    Args:
        model: From :func:`build_language_model`.
        tokens: ``[B, N, hidden]`` projected image tokens, in the order the language model reads them.
        wanted: Indices of the decoder layers whose outputs are returned.
        attention: ``"bidirectional"`` (no mask) or ``"causal"``.

    Returns:
        ``{layer index: [B, N, hidden]}`` for every index in ``wanted``.
    """
    if not wanted:
        return {}
    length = tokens.shape[1]
    position_ids = torch.arange(length, device=tokens.device)[None]
    position_embeddings = rotary_embeddings(model.config, tokens, position_ids)
    # Causal attention as the language model itself applies it over an unpadded sequence: SDPA's own causal flag
    # (transformers skips the mask then; an explicit mask runs another kernel, whose results differ in the last
    # bits on torch 2.7), an explicit additive mask for the other attention implementations.
    implicit = attention == "causal" and model.config._attn_implementation == "sdpa"
    mask = causal_mask(length, tokens.dtype, tokens.device) if attention == "causal" and not implicit else None
    collected: dict[int, torch.Tensor] = {}
    hidden = tokens
    for index, layer in enumerate(model.layers[: max(wanted) + 1]):
        hidden = call_decoder_layer(layer, hidden, position_embeddings, position_ids, mask, is_causal=implicit)
        if index in wanted:
            collected[index] = hidden
    return collected
