"""How EarthMind combines the projected tokens of its SAR and optical images: ``fusion="concat"`` or ``"gate"``.

Both images of a pair pass the same vision tower and projector, giving two token sequences of equal length
``N``, paired position by position (same tile, same cell of the pixel-shuffled grid). EarthMind's release
has two ways of combining them, and :data:`FUSION_MODES` names both:

``"concat"`` (default): the release's inference path. The chat model's ``generate_multi`` projects the SAR
tiles and the optical tiles, then concatenates them tile by tile, SAR first
(``torch.cat([vit_embeds, rgb_vit_embeds], dim=1)``, ``projects/llava_sam2/hf/models/
modeling_earthmind_chat.py`` lines 572-574 of shuyansy/EarthMind); its language model reads, per tile,
``[sar_0 .. sar_{N-1}, optical_0 .. optical_{N-1}]``. Nothing gates them and ``local_query`` is never read.

``"gate"`` (opt-in): the training-time mechanism of the training class (``InternVL_Slowfast._llm_forward``,
``projects/llava_sam2/models/internvl.py`` lines 551-617). Two query vectors ``q_1, q_2`` (``local_query``,
width of the language model) weigh each token against the other modality's token at the same position,
unscaled (the ``2048 ** -0.5`` scale there is commented out, line 107)::

    score_sar[n] = sum_k sum_d q_k[d] * sar[n, d] * optical[n, d]
    sar'[n]      = sigmoid(score_sar[n]) * sar[n]

and the same with the roles swapped for the optical tokens; then ``[sar'; optical']`` as above. The score
is a symmetric bilinear form of the two tokens, so both modalities get the same gate at a position.
Caveat: the released ``local_query`` is probably an untrained N(0, 1) draw. The training code's checkpoint
filter (``LisaModel.state_dict``, ``projects/llava_sam2/models/llava_sam2.py`` lines 229-294) keeps LoRA,
``mlp1.``, the SAM2 mask decoder, ``text_hidden_fcs.``, output and embedding weights, not ``local_query``;
the conversion to the release (``projects/llava_sam2/hf/convert_to_hf.py`` lines 50-60) builds a fresh model,
whose ``local_query`` is ``torch.randn(2, 2048)``, and loads the trained weights into it non-strictly. With
such queries the gates can saturate and wipe tokens out; use ``"gate"`` to fine-tune the queries, not to
reproduce the release.

The TerraTorch feature of either mode is the per-position layout :meth:`FusionOutput.grid`,
``[B, N, 2C]``: position ``n`` holds ``[sar_n, optical_n]`` (SAR channels first), so dense decoders see one
token per grid cell. The release's sequence is the same values reordered: ``grid[b, n, :C]`` is
``sequence[b, n]`` and ``grid[b, n, C:]`` is ``sequence[b, N + n]`` (:func:`sequence_from_grid`).

Both modes hold ``local_query`` under the same state-dict key, so a checkpoint of one mode loads strictly into
the other: ``"gate"`` as a trainable parameter, ``"concat"`` as a buffer (kept, not used, not trained, so no
optimizer state and no unused parameter for distributed training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from earthmind_compat.errors import ConfigurationError, InputError, did_you_mean

#: Number of learned query vectors of the released model (``local_query`` has shape ``[2, 2048]``).
NUM_GATE_QUERIES = 2

#: The fusion modes, with what each one is.
FUSION_MODES: dict[str, str] = {
    "concat": "the release's inference: SAR then optical projected tokens, no gate (default)",
    "gate": "the training-time sigmoid gates from local_query (opt-in; the released queries are probably untrained)",
}

#: The default mode, the one the released model runs at inference.
DEFAULT_FUSION = "concat"


def resolve_fusion(fusion: object) -> str:
    """Check a ``fusion=`` argument and return the mode.

    Args:
        fusion: One of :data:`FUSION_MODES`.

    Raises:
        ConfigurationError: for a non-string (``None`` included) or an unknown mode, naming the choices.
    """
    choices = "; ".join(f"{name!r}: {meaning}" for name, meaning in FUSION_MODES.items())
    if not isinstance(fusion, str):
        raise ConfigurationError(
            f"fusion must be a string naming the mode, got {fusion!r} ({type(fusion).__name__}). Choices: {choices}."
        )
    if fusion not in FUSION_MODES:
        raise ConfigurationError(f"Unknown fusion {fusion!r}.{did_you_mean(fusion, FUSION_MODES)} Choices: {choices}.")
    return fusion


def sequence_from_grid(grid: torch.Tensor) -> torch.Tensor:
    """The release's token order, ``[B, 2N, C]``, from the per-position feature ``[B, N, 2C]``.

    Args:
        grid: A fused projected feature, SAR channels first at every position.

    Returns:
        Per batch item all SAR tokens, then all optical tokens, as the language model reads them.
    """
    if grid.ndim != 3 or grid.shape[-1] % 2:
        raise InputError(f"Expected fused tokens [B, N, 2C] with an even channel count, got {tuple(grid.shape)}.")
    return grid.unflatten(-1, (2, grid.shape[-1] // 2)).transpose(1, 2).flatten(1, 2)


@dataclass
class FusionOutput:
    """The fused tokens of the two modalities.

    Attributes:
        tokens: ``(main, auxiliary)`` tokens as the language model receives them, each ``[B, N, C]``: the
            projected tokens with ``"concat"``, the gated ones with ``"gate"``.
        gates: ``(main, auxiliary)`` gates, each ``[B, N]`` in (0, 1), with ``"gate"``; ``None`` with ``"concat"``.
    """

    tokens: tuple[torch.Tensor, torch.Tensor]
    gates: tuple[torch.Tensor, torch.Tensor] | None = None

    def sequence(self) -> torch.Tensor:
        """EarthMind's order for the language model: ``[B, 2N, C]``, all main tokens then all auxiliary ones."""
        return torch.cat(self.tokens, dim=1)

    def grid(self) -> torch.Tensor:
        """The same values laid out per position, ``[B, N, 2C]`` (main channels first), for dense decoders."""
        return torch.cat(self.tokens, dim=-1)


def _check_pair(main: torch.Tensor, auxiliary: torch.Tensor) -> None:
    if main.shape != auxiliary.shape:
        raise InputError(
            f"Fusion pairs tokens position by position, but got {tuple(main.shape)} and "
            f"{tuple(auxiliary.shape)}; give both modalities the same image size."
        )


class ConcatFusion(nn.Module):
    """The release's inference: the two modalities' tokens side by side, nothing gated.

    Args:
        width: Token width (the language model's hidden size).
        num_queries: Rows of the kept ``local_query`` (2 in the release).

    ``local_query`` is a buffer here: it is loaded from and saved to checkpoints (so a checkpoint of either
    mode loads strictly) but never used or trained.
    """

    def __init__(self, width: int, num_queries: int = NUM_GATE_QUERIES) -> None:
        super().__init__()
        self.register_buffer("local_query", torch.empty(num_queries, width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the (unused) queries from N(0, 1), as the release does."""
        with torch.no_grad():
            self.local_query.normal_(0.0, 1.0)

    def forward(self, main: torch.Tensor, auxiliary: torch.Tensor) -> FusionOutput:
        """Pair the tokens of the two modalities unchanged.

        Args:
            main: ``[B, N, C]`` tokens of the main modality (SAR in EarthMind).
            auxiliary: ``[B, N, C]`` tokens of the auxiliary modality (optical), same positions.

        Returns:
            The tokens, without gates.
        """
        _check_pair(main, auxiliary)
        return FusionOutput(tokens=(main, auxiliary))


class CrossModalGate(nn.Module):
    """Sigmoid gates from learned queries against the other modality (EarthMind's training-time ``local_query``).

    Args:
        width: Token width (the language model's hidden size).
        num_queries: Number of query vectors (2 in the release).

    Random initialisation is standard normal, as in the release (``torch.randn(2, 2048)``); pretrained values
    come from the checkpoint (see the module docstring for why they are probably untrained). At the full
    preset with random weights this gives gate logits with a std of about 2.5, so the gates start spread over
    (0, 1) rather than at 0.5 or saturated.
    """

    def __init__(self, width: int, num_queries: int = NUM_GATE_QUERIES) -> None:
        super().__init__()
        self.local_query = nn.Parameter(torch.empty(num_queries, width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the queries from N(0, 1), as the release does."""
        with torch.no_grad():
            self.local_query.normal_(0.0, 1.0)

    def scores(self, tokens: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Gate logits of ``tokens`` against ``other``: ``sum_k sum_d q_k[d] tokens[..., d] other[..., d]``."""
        return torch.einsum("bnd,bnd,kd->bn", tokens, other, self.local_query)

    def forward(self, main: torch.Tensor, auxiliary: torch.Tensor) -> FusionOutput:
        """Gate each modality's tokens by its agreement with the other one.

        Args:
            main: ``[B, N, C]`` tokens of the main modality (SAR in EarthMind).
            auxiliary: ``[B, N, C]`` tokens of the auxiliary modality (optical), same positions.

        Returns:
            The gated tokens and the gates.
        """
        _check_pair(main, auxiliary)
        main_gate = torch.sigmoid(self.scores(main, auxiliary))
        auxiliary_gate = torch.sigmoid(self.scores(auxiliary, main))
        gated = (main * main_gate.unsqueeze(-1), auxiliary * auxiliary_gate.unsqueeze(-1))
        return FusionOutput(tokens=gated, gates=(main_gate, auxiliary_gate))


def build_fusion(mode: str, width: int) -> ConcatFusion | CrossModalGate:
    """The fusion module of ``mode`` (see :data:`FUSION_MODES`) for tokens of ``width`` channels."""
    return CrossModalGate(width) if resolve_fusion(mode) == "gate" else ConcatFusion(width)
