"""Two processes on CPU (gloo): a DDP step gives the same gradients as one process on the whole batch.

The two-process run is shared with the planner's FSDP check (tests/two_process_runs.py).
"""

from __future__ import annotations

import pytest
import torch
from two_process_runs import ddp_batch, ddp_loss, ddp_model

from earthmind_compat.errors import ConfigurationError, UnknownNameError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["internvl2_5_4b", "granite_4_tiny"])
def test_ddp_two_processes_match_one_process(name, gloo_run):
    model = ddp_model(name)
    halves = ddp_batch(name).chunk(2)
    # DDP averages the gradients of the two halves: the same as the mean of the two half-batch losses
    (0.5 * (ddp_loss(model(halves[0])) + ddp_loss(model(halves[1])))).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for rank in range(2):
        got = torch.load(gloo_run / f"{name}_rank{rank}.pt")
        assert set(got) == set(expected) and len(got) > 0
        for n, g in got.items():
            torch.testing.assert_close(g, expected[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.registry
def test_strategies_for_backbones():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from earthmind_compat.optimize.distributed import lightning_strategy

    lora = ddp_model("internvl2_5_4b")
    ddp = lightning_strategy("ddp", lora, "gloo")
    # Lightning (2.0 to 2.6) keeps DDP's keyword arguments private: the one read of a private attribute here
    assert isinstance(ddp, DDPStrategy) and ddp._ddp_kwargs["find_unused_parameters"] is True
    plain = ddp_model("granite_4_tiny")
    fsdp = lightning_strategy("fsdp", plain, "gloo")
    assert isinstance(fsdp, FSDPStrategy)
    policy = fsdp.kwargs["auto_wrap_policy"]  # a ModuleWrapPolicy: callable, True for the classes it wraps
    assert policy(plain.model.layers[0], recurse=False, nonwrapped_numel=0)
    assert not policy(plain.patch_embed, recurse=False, nonwrapped_numel=0)
    from earthmind_compat.builders import BACKBONE_BUILDERS

    quantized = BACKBONE_BUILDERS["internvl2_5_4b"](preset="tiny", quantization="nf4")
    with pytest.raises(ConfigurationError, match="ddp"):
        lightning_strategy("fsdp", quantized)
    with pytest.raises(UnknownNameError, match="fsdp"):
        lightning_strategy("fsdpp", plain)
