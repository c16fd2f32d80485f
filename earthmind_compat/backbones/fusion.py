"""EarthMind's cross-modal gating of the projected SAR and optical tokens.

After the shared vision tower and projector, EarthMind holds two token sequences of equal length, one per
modality, paired position by position (same tile, same grid cell). Two learned query vectors ``q_1, q_2``
(width of the language model, 2048 for EarthMind-4B) score each position against the other modality::

    score_sar[n] = sum_k sum_d q_k[d] * sar[n, d] * optical[n, d]
    gate_sar[n]  = sigmoid(score_sar[n]),   sar'[n] = gate_sar[n] * sar[n]

and the same with the roles swapped for the optical tokens. The language model then reads
``[sar'; optical']`` (all SAR tokens, then all optical tokens).

Note that the score is a symmetric bilinear form of the two tokens, so in the released computation both
modalities get the same gate at a position; it is computed once per modality here as it is there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from earthmind_compat.errors import InputError

#: Number of learned query vectors of the released model (``local_query`` has shape ``[2, 2048]``).
NUM_GATE_QUERIES = 2


@dataclass
class FusionOutput:
    """Gated tokens and gates of the two modalities.

    Attributes:
        gated: ``(main, auxiliary)`` gated tokens, each ``[B, N, C]``.
        gates: ``(main, auxiliary)`` gates, each ``[B, N]`` in (0, 1).
    """

    gated: tuple[torch.Tensor, torch.Tensor]
    gates: tuple[torch.Tensor, torch.Tensor]

    def sequence(self) -> torch.Tensor:
        """EarthMind's order for the language model: ``[B, 2N, C]``, all main tokens then all auxiliary ones."""
        return torch.cat(self.gated, dim=1)

    def grid(self) -> torch.Tensor:
        """The same values laid out per position, ``[B, N, 2C]`` (main channels first), for dense decoders."""
        return torch.cat(self.gated, dim=-1)


class CrossModalGate(nn.Module):
    """Sigmoid gates from learned queries against the other modality (EarthMind's ``local_query``).

    Args:
        width: Token width (the language model's hidden size).
        num_queries: Number of query vectors (2 in the release).

    Random initialisation is standard normal, as in the release (``torch.randn(2, 2048)``); pretrained values
    come from the checkpoint. At the full preset with random weights this gives gate logits with a std of
    about 2.5, so the gates start spread over (0, 1) rather than at 0.5 or saturated.
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
        if main.shape != auxiliary.shape:
            raise InputError(
                f"Cross-modal gating pairs tokens position by position, but got {tuple(main.shape)} and "
                f"{tuple(auxiliary.shape)}; give both modalities the same image size."
            )
        main_gate = torch.sigmoid(self.scores(main, auxiliary))
        auxiliary_gate = torch.sigmoid(self.scores(auxiliary, main))
        gated = (main * main_gate.unsqueeze(-1), auxiliary * auxiliary_gate.unsqueeze(-1))
        return FusionOutput(gated=gated, gates=(main_gate, auxiliary_gate))
