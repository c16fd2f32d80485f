"""One two-process gloo run on CPU for every distributed check of the suite.

The DDP gradient check (tests/test_distributed.py) and the planner's FSDP check (tests/test_plan.py) share one
pair of processes and one process group: each rank does the DDP steps, then the FSDP2 step, and writes what it
saw into a directory. The ranks are forked where the platform can (Linux): a forked rank inherits the imported
torch, transformers and TerraTorch, where a spawned one starts cold and imports them again (~12 s of CPU per
rank on the 2-core machine). tests/conftest.py starts the run in the background when the session starts
(:func:`start`, once per test run for every pytest-xdist worker) and the tests that read it wait for it
(:func:`wait`).
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
import warnings
from pathlib import Path

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
    # the rank's own output goes to its log, not into whatever test the parent is capturing meanwhile
    log = os.open(os.path.join(out_dir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    torch.set_num_threads(1)  # as a spawned rank under the suite's OMP_NUM_THREADS=1, whatever the parent set
    try:
        # a file rendezvous: no port to pick, so no race with other processes for a free one
        rendezvous = f"file://{os.path.join(out_dir, 'rendezvous')}"
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD)
        try:
            _ddp_steps(rank, out_dir)
            _fsdp_step(rank, out_dir)
        finally:
            dist.destroy_process_group()
    except BaseException:
        Path(out_dir, f"failed_rank{rank}").write_text(traceback.format_exc())
        raise
    Path(out_dir, f"done_rank{rank}").touch()


def start(out_dir: str) -> None:
    """Start the two ranks in the background and return at once.

    A daemon thread joins them (so they are reaped, and a rank that dies without a traceback, e.g. killed by a
    signal, is reported in ``failed``); :func:`wait` blocks until they are done.

    Args:
        out_dir: An existing directory for the run's files.
    """
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with warnings.catch_warnings():
        # Python >= 3.12 warns that forking a multi-threaded process (pytest-xdist's worker has an I/O thread) can
        # deadlock on a lock another thread held; the ranks touch no such lock: they run torch in their own
        # process group, write files and leave through os._exit, as torch's own DataLoader workers do.
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        context = mp.start_processes(_worker, args=(out_dir,), nprocs=WORLD, join=False, start_method=method)

    def reap() -> None:
        try:
            while not context.join():
                pass
        except Exception as error:  # a rank raised (its traceback is in failed_rank<r>) or died of a signal
            Path(out_dir, "failed").write_text(f"{type(error).__name__}: {error}")

    threading.Thread(target=reap, name="gloo-run-reaper", daemon=True).start()


def wait(out_dir: str, timeout: float = 600.0) -> None:
    """Block until both ranks of the run in ``out_dir`` are done.

    Args:
        out_dir: The directory :func:`start` was given.
        timeout: Seconds to wait before giving up.

    Raises:
        RuntimeError: A rank failed (with its traceback and log), or the run did not finish within ``timeout``.
    """
    directory = Path(out_dir)
    deadline = time.monotonic() + timeout
    while not all((directory / f"done_rank{rank}").exists() for rank in range(WORLD)):
        failures = sorted(directory.glob("failed*"))
        if failures:
            logs = [path.read_text()[-3000:] for path in sorted(directory.glob("rank*.log"))]
            report = "\n".join([path.read_text() for path in failures] + logs)
            raise RuntimeError(f"the two-process gloo run in {out_dir} failed:\n{report}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the two-process gloo run in {out_dir} did not finish within {timeout:.0f} s")
        time.sleep(0.2)
