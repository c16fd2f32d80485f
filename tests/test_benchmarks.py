"""Layer 4: pytest-benchmark speed and memory per backbone x technique x mode.

CPU at the tiny preset in the default run (two timed rounds, so the suite stays fast); ``gpu``-marked
tests at the full preset in bf16 on CUDA, or at tiny size on CPU with ``EARTHMIND_GPU_ON_CPU=1``.
Assertions compare figures measured in the same run (byte counts are exact; times are only recorded).
Regression gate for users: ``pytest -m benchmark --benchmark-storage=file://benchmarks
--benchmark-compare=0001 --benchmark-compare-fail=median:25%`` (see README).
"""

from __future__ import annotations

import os

import pytest
import torch
from planner_probes import PLANNED_TECHNIQUES, PROBES, SMOKE_PROBES, probe_preset

from earthmind_compat import optimize
from earthmind_compat.bench import (
    BENCHMARK_TECHNIQUES,
    benchmark_input,
    build_for_benchmark,
    make_step,
    measure,
    planner_calibration,
    saved_activation_bytes,
    wrapper_overhead,
)
from earthmind_compat.builders import BACKBONE_BUILDERS

pytestmark = pytest.mark.benchmark
BACKBONES = sorted(BACKBONE_BUILDERS)


@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("technique", BENCHMARK_TECHNIQUES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_speed_and_memory(benchmark, backbone, technique, mode):
    benchmark.group = f"{backbone}-{mode}"
    model = build_for_benchmark(backbone, technique)
    x = benchmark_input(model, backbone, "tiny", 2, "cpu")
    activations = saved_activation_bytes(model, x) if mode == "train" else 0
    loss = benchmark.pedantic(make_step(model, mode, x), rounds=2, iterations=1, warmup_rounds=1)
    assert torch.isfinite(loss)
    benchmark.extra_info.update(
        weight_bytes=optimize.memory_bytes(model),
        activation_bytes=activations,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_second"] = 2 / benchmark.stats.stats.median


@pytest.mark.parametrize("backbone", BACKBONES)
def test_techniques_save_what_they_promise(backbone):
    """Same-run ratios: quantization shrinks weights, checkpointing shrinks saved activations."""

    def weights(technique: str) -> int:
        return optimize.memory_bytes(build_for_benchmark(backbone, technique))

    def activations(technique: str) -> int:
        model = build_for_benchmark(backbone, technique)
        return saved_activation_bytes(model, benchmark_input(model, backbone, "tiny", 2, "cpu"))

    full, int8, nf4 = weights("none"), weights("int8"), weights("nf4")
    assert nf4 < int8 < full
    assert activations("ckpt") < 0.5 * activations("none")


def test_saved_activation_bytes_counts_what_autograd_keeps():
    x = torch.randn(8, 64)
    block = 8 * 64 * 4  # one [8, 64] float32 tensor
    # Linear keeps its input x; the benchmark loss (square) keeps the output: 2 tensors, weights excluded
    assert saved_activation_bytes(torch.nn.Sequential(torch.nn.Linear(64, 64)), x) == 2 * block
    # tanh's output is kept by tanh and by the second Linear: one storage, counted once
    stack = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64))
    assert saved_activation_bytes(stack, x) == 3 * block


def test_wrapper_overhead(benchmark):
    """Our forward against the bare transformers vision model: target <= 3 % median overhead.

    Measured at 224 px (about 10 ms of single-thread compute per call, so the figure is the wrapper's cost,
    not timer noise), as CPU time of interleaved pairs; see ``wrapper_overhead``.
    """
    result = wrapper_overhead(preset="tiny", side=224, rounds=41)
    benchmark.extra_info.update(result)
    model = build_for_benchmark("internvl2_5_4b")
    x = benchmark_input(model, "internvl2_5_4b", "tiny", 2, "cpu")
    benchmark.pedantic(make_step(model, "forward", x), rounds=2, iterations=1)
    if os.environ.get("EARTHMIND_BENCH_STRICT") != "1":
        pytest.skip(
            f"measured overhead {result['overhead']:+.1%} recorded in extra_info; the <= 3 % target is enforced "
            "by `nox -s benchmarks` (EARTHMIND_BENCH_STRICT=1) on a quiet machine, not in the shared CI run"
        )
    assert result["overhead"] <= 0.03, result


@pytest.mark.gpu
@pytest.mark.parametrize("technique", BENCHMARK_TECHNIQUES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_gpu_speed_and_memory(benchmark, backbone, technique, device):
    """Full preset in bf16 on CUDA (synchronised timing, max_memory_allocated); tiny on CPU otherwise."""
    on_cuda = device == "cuda"
    preset = "full" if on_cuda else "tiny"
    dtype = torch.bfloat16 if on_cuda else None
    result = measure(backbone, technique, "train", preset, device, batch=2, rounds=3, dtype=dtype)
    benchmark.extra_info.update(result.as_dict())
    model = build_for_benchmark(backbone, technique, preset, device, dtype)
    x = benchmark_input(model, backbone, preset, 2, device).to(dtype or torch.float32)
    step = make_step(model, "forward", x)

    def synchronised() -> torch.Tensor:
        out = step()
        if on_cuda:
            torch.cuda.synchronize()
        return out

    assert torch.isfinite(benchmark.pedantic(synchronised, rounds=3, iterations=1, warmup_rounds=1))
    assert result.weight_bytes > 0 and result.median_seconds > 0
    assert (result.cuda_peak_bytes is not None) == on_cuda


def test_int8_cast_notice_is_silenced_and_nothing_else(caplog, monkeypatch):
    """bitsandbytes 0.50 logs a notice on every int8 matmul; a benchmark sweep would print it thousands of times."""
    import logging

    from earthmind_compat.bench.measure import quiet_bitsandbytes

    logger = logging.getLogger("bitsandbytes.autograd._functions")
    monkeypatch.setattr(logger, "filters", [])  # as before any benchmark ran (they install the filter)
    notice = "MatMul8bitLt: inputs will be cast from %s to float16 during quantization"
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(notice, torch.float32)
        assert len(caplog.records) == 1  # it is logged (so the filter below is what removes it)
        quiet_bitsandbytes()
        logger.warning(notice, torch.float32)
        logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records][1:] == ["some other bitsandbytes warning"]


@pytest.mark.gpu
@pytest.mark.parametrize("technique", PLANNED_TECHNIQUES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_gpu_planner_calibration(benchmark, monkeypatch, backbone, technique, device):
    """The plan next to a measured training step, into the benchmark JSON (``extra_info``) for calibration.

    On CUDA: the full-width two-block probe of the planner's accuracy grid at its smaller image size, where
    the planned tensors must not be below ``max_memory_allocated`` (the CUDA attention kernels may keep less
    than the CPU trace: above is allowed; the JSON says by how much). On CPU (``EARTHMIND_GPU_ON_CPU=1``): the
    small probe, whose whole step (states counted from the tensors, activations from allocator events) must
    be within [0, +10 %] of the plan.
    """
    on_cuda = device == "cuda"
    widths, sizes = (PROBES if on_cuda else SMOKE_PROBES)[backbone]
    preset = probe_preset(monkeypatch, backbone, widths[-1], smoke=not on_cuda)
    result = benchmark.pedantic(
        planner_calibration, args=(backbone, preset, technique, 2, sizes[0], device), rounds=1, iterations=1
    )
    benchmark.extra_info.update(result.as_dict())
    assert result.error >= 0.0, result.as_dict()
    if on_cuda:
        assert result.measured_reserved is not None and result.measured_context is not None
    else:
        assert result.error <= 0.10, result.as_dict()
