"""Timing and memory of one backbone x technique x mode (forward or training step).

Memory is measured where it can be measured exactly:

* weights: the bytes of every parameter and buffer as stored (quantized storage and its scales included),
  from :func:`earthmind_compat.optimize.memory_bytes`;
* activations kept for the backward pass: the bytes of every distinct tensor autograd saves during the
  forward, counted with ``torch.autograd.graph.saved_tensors_hooks`` by the memory planner's own counter,
  :func:`earthmind_compat.optimize.plan.saved_bytes` (the memory that activation checkpointing removes);
  weights that autograd saves are not counted twice;
* on CUDA, in addition, the allocator's real peak (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from terratorch.registry import BACKBONE_REGISTRY
from torch import nn

from earthmind_compat import optimize
from earthmind_compat.backbones import InternVLBackbone, backbone_class
from earthmind_compat.compat import call_with_hidden_states
from earthmind_compat.errors import unknown_name
from earthmind_compat.optimize.plan import saved_bytes
from earthmind_compat.optimize.quantize import weight_storages
from earthmind_compat.optimize.techniques import parse_technique

#: The techniques a benchmark sweep covers, in table order.
BENCHMARK_TECHNIQUES = ("none", "int8", "nf4", "lora", "ckpt", "qlora")


@dataclass
class Measurement:
    """One benchmark result.

    Attributes:
        backbone: Registered backbone name.
        technique: Canonical technique string.
        preset: Backbone preset.
        device: ``"cpu"`` or ``"cuda"``.
        mode: ``"forward"`` (no grad, eval) or ``"train"`` (forward + backward).
        batch: Images per call.
        image_size: Side of the square input in pixels.
        median_seconds: Median time of one call.
        images_per_second: ``batch / median_seconds``.
        weight_bytes: Bytes of parameters and buffers as stored.
        activation_bytes: Bytes autograd saved for the backward pass (0 in forward mode).
        cuda_peak_bytes: ``torch.cuda.max_memory_allocated`` during the calls (``None`` on CPU).
        rounds: Timed calls.
    """

    backbone: str
    technique: str
    preset: str
    device: str
    mode: str
    batch: int
    image_size: int
    median_seconds: float
    images_per_second: float
    weight_bytes: int
    activation_bytes: int
    cuda_peak_bytes: int | None
    rounds: int

    def as_dict(self) -> dict:
        """Plain dictionary for JSON."""
        return asdict(self)


_INT8_CAST_NOTICE = "MatMul8bitLt: inputs will be cast"


def _not_int8_cast_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_INT8_CAST_NOTICE)


def quiet_bitsandbytes() -> None:
    """Silence bitsandbytes' per-call notice that int8 matmuls cast float32 inputs to float16.

    Older bitsandbytes releases issue it as a warning, 0.50 logs it (once per call, so a benchmark would
    print it thousands of times); both are dropped, nothing else is.
    """
    warnings.filterwarnings("ignore", message=_INT8_CAST_NOTICE, category=UserWarning)
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _not_int8_cast_notice not in logger.filters:
        logger.addFilter(_not_int8_cast_notice)


def build_for_benchmark(
    backbone: str, technique: str = "none", preset: str = "tiny", device: str = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """Build ``backbone`` through TerraTorch's registry, move it to ``device``, apply ``technique``.

    Args:
        backbone: Registered name.
        technique: A technique string of :mod:`earthmind_compat.optimize` (``"none"`` for full precision).
        preset: Backbone preset.
        device: Target device.
        dtype: Cast floating weights to this dtype before quantizing (e.g. ``torch.bfloat16`` on GPU).

    Returns:
        The model, in train mode.
    """
    model = BACKBONE_REGISTRY.build(backbone, preset=preset)
    quiet_bitsandbytes()
    if dtype is not None:
        model = model.to(dtype=dtype)
    model = model.to(device)
    optimize.apply(model, technique)
    return model.to(device).train()


def benchmark_input(model: nn.Module, backbone: str, preset: str, batch: int, device: str) -> torch.Tensor:
    """A reproducible random batch of the size ``backbone`` is benchmarked at, at ``preset`` (``spec.input_sizes``)."""
    side = backbone_class(backbone).spec.input_size(preset)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.in_chans, side, side, generator=generator)
    return x.to(device)


def _loss(features: list[torch.Tensor] | dict) -> torch.Tensor:
    if isinstance(features, dict):
        features = list(features.values())
    return sum(f.float().pow(2).mean() for f in features)


def make_step(model: nn.Module, mode: str, x: torch.Tensor | dict) -> Callable[[], torch.Tensor]:
    """A zero-argument callable doing one forward (``mode="forward"``) or one training step (``"train"``).

    The training step is forward, a mean-square loss over every feature, backward, and clearing the
    gradients (no optimizer update, so every call does the same work).
    """
    if mode == "forward":
        model.eval()

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return _loss(model(x))

        return forward
    if mode != "train":
        raise unknown_name("benchmark mode", mode, ("forward", "train"))
    model.train()

    def train_step() -> torch.Tensor:
        loss = _loss(model(x))
        loss.backward()
        for param in model.parameters():
            param.grad = None
        return loss.detach()

    return train_step


def saved_activation_bytes(model: nn.Module, x: torch.Tensor | dict) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one training forward of ``model``.

    Counted by :func:`earthmind_compat.optimize.plan.saved_bytes` (the planner's rule); the weights autograd
    saves (parameters, their quantization state, buffers) are excluded: they are counted as weights.
    """
    model.train()
    return saved_bytes(lambda: _loss(model(x)), weight_storages(model))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(step: Callable[[], object], device: str, rounds: int, warmup: int = 1) -> list[float]:
    """Wall time of ``rounds`` calls of ``step`` after ``warmup`` calls, synchronising CUDA around each."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def measure(
    backbone: str,
    technique: str = "none",
    mode: str = "forward",
    preset: str = "tiny",
    device: str = "cpu",
    batch: int = 2,
    rounds: int = 5,
    dtype: torch.dtype | None = None,
) -> Measurement:
    """Build, warm up and time one backbone x technique x mode; measure its memory.

    Returns:
        A :class:`Measurement`.
    """
    model = build_for_benchmark(backbone, technique, preset, device, dtype)
    x = benchmark_input(model, backbone, preset, batch, device)
    if dtype is not None:
        x = x.to(dtype)
    activations = saved_activation_bytes(model, x) if mode == "train" else 0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = time_calls(make_step(model, mode, x), device, rounds)
    median = statistics.median(times)
    return Measurement(
        backbone=backbone,
        technique=parse_technique(technique).name,
        preset=preset,
        device=device,
        mode=mode,
        batch=batch,
        image_size=x.shape[-1],
        median_seconds=median,
        images_per_second=batch / median,
        weight_bytes=optimize.memory_bytes(model),
        activation_bytes=activations,
        cuda_peak_bytes=torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
        rounds=rounds,
    )


def wrapper_overhead(preset: str = "tiny", batch: int = 2, rounds: int = 21, side: int | None = None) -> dict:
    """Median forward cost of ``internvl2_5_4b`` against the bare transformers vision model it wraps.

    Both get the same weights and input; the bare model is asked for all hidden states (what a user of
    transformers would do to get per-layer features). Cost is the CPU time of the calling thread with torch
    limited to that one thread, so time spent descheduled by other processes does not count, and calls
    alternate between the two models so both see the same cache and frequency state.

    Returns:
        Median CPU seconds of each, and ``overhead``: the median over interleaved pairs of
        ``ours / bare``, minus 1 (negative when ours is cheaper).
    """
    model = BACKBONE_REGISTRY.build(InternVLBackbone.spec.name, preset=preset, out_indices=[-1]).eval()
    bare = model.model
    side = side or InternVLBackbone.spec.input_size(preset)
    x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(0))

    def cost(call: Callable[[], object]) -> float:
        start = time.thread_time()
        call()
        return time.thread_time() - start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ours_times, bare_times = [], []
    try:
        with torch.no_grad():
            for _ in range(2):
                model(x), call_with_hidden_states(bare, x)
            for _ in range(rounds):
                ours_times.append(cost(lambda: model(x)))
                bare_times.append(cost(lambda: call_with_hidden_states(bare, x)))
    finally:
        torch.set_num_threads(threads)
    ratios = [a / b for a, b in zip(ours_times, bare_times, strict=True)]
    return {
        "ours": statistics.median(ours_times),
        "bare": statistics.median(bare_times),
        "overhead": statistics.median(ratios) - 1,
    }
