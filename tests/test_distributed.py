"""Two processes on CPU (gloo): a DDP step gives the same gradients as one process on the whole batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from earthmind_compat.errors import ConfigurationError, UnknownNameError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TECHNIQUE = {"internvl2_5_4b": "lora+ckpt", "granite_4_tiny": "none"}


def _model(name: str):
    from earthmind_compat.builders import BACKBONE_BUILDERS

    torch.manual_seed(0)
    return BACKBONE_BUILDERS[name](preset="tiny", in_chans=3, technique=TECHNIQUE[name]).train()


def _batch(name: str) -> torch.Tensor:
    size = 56 if name.startswith("internvl") else 32
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))


def _loss(features) -> torch.Tensor:
    return sum(f.pow(2).mean() for f in features)


def _worker(rank: int, world: int, names: list[str], out_dir: str) -> None:
    # a file rendezvous: no port to pick, so no race with other processes for a free one
    rendezvous = f"file://{os.path.join(out_dir, 'rendezvous')}"
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        for name in names:  # one process group for every backbone: each spawned process starts cold (~15 s)
            model = torch.nn.parallel.DistributedDataParallel(_model(name), find_unused_parameters=False)
            shard = _batch(name).chunk(world)[rank]
            _loss(model(shard)).backward()
            grads = {n: p.grad.clone() for n, p in model.module.named_parameters() if p.grad is not None}
            torch.save(grads, os.path.join(out_dir, f"{name}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_gradients(tmp_path_factory) -> Path:
    """One two-process DDP run (gloo, CPU) over every backbone of :data:`TECHNIQUE`; the gradients per rank."""
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, list(TECHNIQUE), str(out_dir)), nprocs=2, join=True)
    return out_dir


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["internvl2_5_4b", pytest.param("granite_4_tiny", marks=pytest.mark.slow)])
def test_ddp_two_processes_match_one_process(name, ddp_gradients):
    model = _model(name)
    halves = _batch(name).chunk(2)
    # DDP averages the gradients of the two halves: the same as the mean of the two half-batch losses
    (0.5 * (_loss(model(halves[0])) + _loss(model(halves[1])))).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for rank in range(2):
        got = torch.load(ddp_gradients / f"{name}_rank{rank}.pt")
        assert set(got) == set(expected) and len(got) > 0
        for n, g in got.items():
            torch.testing.assert_close(g, expected[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.registry
def test_strategies_for_backbones():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from earthmind_compat.optimize.distributed import lightning_strategy

    lora = _model("internvl2_5_4b")
    ddp = lightning_strategy("ddp", lora, "gloo")
    # Lightning (2.0 to 2.6) keeps DDP's keyword arguments private: the one read of a private attribute here
    assert isinstance(ddp, DDPStrategy) and ddp._ddp_kwargs["find_unused_parameters"] is True
    plain = _model("granite_4_tiny")
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
