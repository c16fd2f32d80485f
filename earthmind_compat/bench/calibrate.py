"""The planner against one measured training step, on CPU or CUDA: the figures that calibrate its terms.

:func:`planner_calibration` plans a configuration (:func:`earthmind_compat.optimize.plan.plan_memory`), then
builds it for real on the device, with AdamW over the trainable parameters, and measures one forward and
backward after a warm-up step and update (so gradients and optimizer state exist, as the plan assumes; the
optimizer step's own temporaries are not part of the plan):

- on CUDA: ``torch.cuda.max_memory_allocated`` (tensors) and ``max_memory_reserved`` (the caching allocator's
  segments) over the step, and the CUDA context (``torch.cuda.mem_get_info``'s used bytes, less what the
  allocator reserved, right after the first allocation of the process);
- on CPU: the bytes held before the step (weights, gradients, optimizer state, counted from the tensors) plus
  the step's peak above them from the PyTorch profiler's allocator events
  (:func:`earthmind_compat.optimize.plan.profiled_peak`).

``nox -s gpu_benchmarks`` writes the result of each case into its JSON (``extra_info``), next to the plan, so
that one GPU run says how far the CUDA terms of :mod:`earthmind_compat.optimize.cuda_memory` are off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from earthmind_compat.bench.measure import build_for_benchmark
from earthmind_compat.optimize import memory_bytes
from earthmind_compat.optimize.plan import plan_memory, profiled_peak


@dataclass
class Calibration:
    """A plan next to the measurement of the same training step.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        planned_allocated: The plan's tensors: weights, gradients, optimizer state, activations (on CUDA with
            the cuBLAS workspaces, which the allocator serves).
        measured_allocated: Measured peak of the step's tensors.
        planned_reserved: ``planned_allocated`` plus the planned allocator reserve (CUDA), else ``None``.
        measured_reserved: ``torch.cuda.max_memory_reserved`` over the step (CUDA), else ``None``.
        planned_context: The planned CUDA context (CUDA), else ``None``.
        measured_context: The measured CUDA context (CUDA), else ``None``.
    """

    device: str
    planned_allocated: int
    measured_allocated: int
    planned_reserved: int | None = None
    measured_reserved: int | None = None
    planned_context: int | None = None
    measured_context: int | None = None

    @property
    def error(self) -> float:
        """Relative error of the planned tensors: ``planned / measured - 1`` (negative: the plan is below)."""
        return self.planned_allocated / self.measured_allocated - 1.0

    def as_dict(self) -> dict:
        """Plain dictionary for JSON, with the error."""
        return {**asdict(self), "error": self.error}


def _cuda_context() -> int:
    torch.zeros(1, device="cuda")  # the first allocation creates the context
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    states = sum(t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    return memory_bytes(model) + grads + states


def planner_calibration(
    backbone: str, preset: str, technique: str, batch: int, image_size: int, device: str
) -> Calibration:
    """Plan ``backbone`` x ``technique`` and measure the same training step on ``device`` (module docstring).

    Args:
        backbone: Registered backbone name.
        preset: Its preset (the full-width two-block probes of the tests, or any other).
        technique: Technique string.
        batch: Images per step.
        image_size: Image side in pixels.
        device: ``"cpu"`` or ``"cuda"``.
    """
    plan = plan_memory(backbone, preset, technique, batch_size=batch, image_size=image_size, device=device)
    on_cuda = device == "cuda"
    context = _cuda_context() if on_cuda else None
    torch.manual_seed(0)
    model = build_for_benchmark(backbone, technique, preset, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    x = torch.randn(batch, model.in_chans, image_size, image_size, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    directions: list[torch.Tensor] = []

    def step() -> None:
        features = model(x)
        if not directions:  # a fixed direction per feature, as a decoder's gradient
            generator = torch.Generator().manual_seed(1)
            directions.extend(torch.randn(f.shape, generator=generator).to(f) for f in features)
        sum((f * d).sum() for f, d in zip(features, directions, strict=True)).backward()

    step()  # warm-up: gradients and optimizer state exist from here on, zeroed gradients stay allocated
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    planned_allocated = plan.weights + plan.gradients + plan.optimizer + plan.activations
    if not on_cuda:
        return Calibration(device, planned_allocated, _state_bytes(model, optimizer) + profiled_peak(step))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    planned_allocated += plan.cuda_workspace
    return Calibration(
        device,
        planned_allocated,
        torch.cuda.max_memory_allocated(),
        planned_allocated + plan.allocator_reserve,
        torch.cuda.max_memory_reserved(),
        plan.cuda_context,
        context,
    )
