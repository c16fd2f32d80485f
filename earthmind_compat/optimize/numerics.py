"""Where quantization acts: per-block error of an optimized backbone against its full-precision twin.

Comparing final outputs hides quantization error: InternViT's layer scale (0.1 at init) and the residual
stream make a block's output mostly its input. Each block is therefore compared on its *residual branch*
(output minus input), fed the same input as the reference block received.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from earthmind_compat.compat import first_tensor
from earthmind_compat.optimize.families import find_blocks


@dataclass(frozen=True)
class BlockError:
    """Error of one block's residual branch.

    Attributes:
        index: Block index.
        cosine: Cosine similarity of the candidate's and the reference's branch (1 is perfect).
        rel_error: ``||candidate - reference|| / ||reference||`` of the branch (0 is perfect).
    """

    index: int
    cosine: float
    rel_error: float


@torch.no_grad()
def block_errors(reference: nn.Module, candidate: nn.Module, x: torch.Tensor) -> list[BlockError]:
    """Run ``reference`` on ``x``, then each block of ``candidate`` on the input its twin received.

    Args:
        reference: Full-precision backbone.
        candidate: The same backbone with a technique applied (same block structure).
        x: Input batch.

    Returns:
        One :class:`BlockError` per block that ran.
    """
    ref_blocks, cand_blocks = find_blocks(reference), find_blocks(candidate)
    calls: dict[int, tuple[tuple, dict, torch.Tensor]] = {}

    def capture(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            calls.setdefault(index, (args, kwargs, first_tensor(output)))

        return hook

    handles = [b.register_forward_hook(capture(i), with_kwargs=True) for i, b in enumerate(ref_blocks)]
    try:
        reference(x)
    finally:
        for handle in handles:
            handle.remove()
    errors = []
    for index in sorted(calls):
        args, kwargs, ref_out = calls[index]
        block_input = first_tensor(args) if args else first_tensor(next(iter(kwargs.values())))
        cand_out = first_tensor(cand_blocks[index](*args, **kwargs))
        ref_delta = (ref_out - block_input).double().flatten()
        cand_delta = (cand_out - block_input).double().flatten()
        cosine = torch.nn.functional.cosine_similarity(ref_delta, cand_delta, dim=0).item()
        rel = ((cand_delta - ref_delta).norm() / ref_delta.norm().clamp_min(1e-30)).item()
        errors.append(BlockError(index, cosine, rel))
    return errors
