"""One two-process gloo run on CPU for every distributed check of the suite.

A spawned process starts cold (importing torch, transformers and TerraTorch takes ~12 s on the 2-core machine),
so the DDP gradient check (tests/test_distributed.py) and the planner's FSDP check (tests/test_plan.py) share one
``torch.multiprocessing.spawn`` and one process group: :func:`run` does the DDP steps, then the FSDP2 step, and
writes what each rank saw into a directory. The session fixture ``gloo_run`` (tests/conftest.py) calls it once
per test run, for every pytest-xdist worker.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: Technique per backbone of the DDP check.
DDP_TECHNIQUE = {"internvl2_5_4b": "lora+ckpt", "granite_4_tiny": "none"}
#: The FSDP check: backbone, batch per rank, image size, and its two-block preset (``probe_fsdp``).
FSDP_NAME, FSDP_BATCH, FSDP_SIZE = "internvl2_5_4b", 2, 224
FSDP_PRESET = "probe_fsdp"
WORLD = 2


def fsdp_settings() -> dict:
    """The FSDP check's preset: InternViT's full settings at width 256 with two blocks."""
    from earthmind_compat.backbones import backbone_class

    return dict(
        backbone_class(FSDP_NAME).spec.presets["full"],
        num_hidden_layers=2,
        hidden_size=256,
        num_attention_heads=4,
        intermediate_size=1024,
    )


def ddp_model(name: str) -> torch.nn.Module:
    """The DDP check's model of ``name`` (tiny preset, its technique), seeded."""
    from earthmind_compat.builders import BACKBONE_BUILDERS

    torch.manual_seed(0)
    return BACKBONE_BUILDERS[name](preset="tiny", in_chans=3, technique=DDP_TECHNIQUE[name]).train()


def ddp_batch(name: str) -> torch.Tensor:
    """The DDP check's whole batch of ``name`` (each rank takes its half)."""
    size = 56 if name.startswith("internvl") else 32
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))


def ddp_loss(features: list[torch.Tensor]) -> torch.Tensor:
    """The DDP check's loss."""
    return sum(f.pow(2).mean() for f in features)


def _ddp_steps(rank: int, out_dir: str) -> None:
    for name in DDP_TECHNIQUE:
        model = torch.nn.parallel.DistributedDataParallel(ddp_model(name), find_unused_parameters=False)
        shard = ddp_batch(name).chunk(WORLD)[rank]
        ddp_loss(model(shard)).backward()
        grads = {n: p.grad.clone() for n, p in model.module.named_parameters() if p.grad is not None}
        torch.save(grads, os.path.join(out_dir, f"{name}_rank{rank}.pt"))


def _fsdp_step(rank: int, out_dir: str) -> None:
    """FSDP2 (each block a unit) on CPU: the local shard's bytes and the forward+backward peak after a warm-up."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from earthmind_compat.backbones import backbone_class
    from earthmind_compat.builders import BACKBONE_BUILDERS
    from earthmind_compat.optimize.families import find_blocks
    from earthmind_compat.optimize.plan import profiled_peak

    backbone_class(FSDP_NAME).spec.presets[FSDP_PRESET] = fsdp_settings()  # a spawned process has only its own
    torch.manual_seed(0)
    model = BACKBONE_BUILDERS[FSDP_NAME](preset=FSDP_PRESET, in_chans=3)
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in find_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    local = sum(p.to_local().untyped_storage().nbytes() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(FSDP_BATCH, 3, FSDP_SIZE, FSDP_SIZE, generator=torch.Generator().manual_seed(rank))
    directions: list[torch.Tensor] = []

    def forward_backward() -> None:
        features = model(x)
        if not directions:
            directions.extend(torch.randn(f.shape, generator=torch.Generator().manual_seed(1)) for f in features)
        sum((f * d).sum() for f, d in zip(features, directions, strict=True)).backward()

    forward_backward()  # warm-up step: optimizer state exists, gradients freed as Lightning does
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    peak = profiled_peak(forward_backward)
    with open(os.path.join(out_dir, f"fsdp_rank{rank}.json"), "w") as handle:
        json.dump({"weights": local, "peak": peak}, handle)


def _worker(rank: int, out_dir: str) -> None:
    # a file rendezvous: no port to pick, so no race with other processes for a free one
    rendezvous = f"file://{os.path.join(out_dir, 'rendezvous')}"
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD)
    try:
        _ddp_steps(rank, out_dir)
        _fsdp_step(rank, out_dir)
    finally:
        dist.destroy_process_group()


def run(out_dir: str) -> None:
    """Spawn the two ranks; they write ``<backbone>_rank<r>.pt`` (DDP gradients) and ``fsdp_rank<r>.json``."""
    mp.spawn(_worker, args=(out_dir,), nprocs=WORLD, join=True)
