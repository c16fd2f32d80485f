"""Measure the per-block error of quantized language layers (the tolerances of ``tests/test_language_layers.py``).

Relative error and 1 - cosine of each language block's residual branch, quantized vs fp32, over 20 seeds (model
init and input) x the 4 language blocks of ``internvl2_5_4b`` tiny with ``language_layers=4``::

    python -m tools.language_tolerance

Repository tooling, not shipped in the wheel.
"""

from __future__ import annotations

import copy
import statistics
import warnings

VISION_BLOCKS = 4  # the tiny tower's layers come first in find_blocks


def main() -> None:
    """Print mean and standard deviation per quantization."""
    import torch

    from earthmind_compat.builders import BACKBONE_BUILDERS
    from earthmind_compat.optimize import apply
    from earthmind_compat.optimize.numerics import block_errors

    warnings.filterwarnings("ignore")
    for quantization in ("int8", "nf4", "fp4"):
        rel, cos = [], []
        for seed in range(20):
            torch.manual_seed(seed)
            reference = BACKBONE_BUILDERS["internvl2_5_4b"](
                preset="tiny", in_chans=4, language_layers=4, out_indices=[-1]
            ).eval()
            candidate = copy.deepcopy(reference)
            apply(candidate, quantization)
            x = torch.randn(2, 4, 56, 56, generator=torch.Generator().manual_seed(100 + seed))
            errors = [e for e in block_errors(reference, candidate.eval(), x) if e.index >= VISION_BLOCKS]
            rel += [e.rel_error for e in errors]
            cos += [1 - e.cosine for e in errors]
        print(
            f"{quantization}: rel {statistics.mean(rel):.4f} +- {statistics.stdev(rel):.4f}  "
            f"1-cos {statistics.mean(cos):.5f} +- {statistics.stdev(cos):.5f}  (max rel {max(rel):.4f})"
        )


if __name__ == "__main__":
    main()
