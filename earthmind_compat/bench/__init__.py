"""Speed and memory of each backbone x technique: measurement, tables, JSON and charts.

Used by the pytest-benchmark layer (``tests/test_benchmarks.py``) and by ``earthmind-compat benchmark``
and ``earthmind-compat optimize``.
"""

from __future__ import annotations

from earthmind_compat.bench.calibrate import Calibration, planner_calibration
from earthmind_compat.bench.measure import (
    BENCHMARK_TECHNIQUES,
    Measurement,
    benchmark_input,
    build_for_benchmark,
    make_step,
    measure,
    saved_activation_bytes,
    wrapper_overhead,
)

__all__ = [
    "BENCHMARK_TECHNIQUES",
    "Calibration",
    "Measurement",
    "benchmark_input",
    "build_for_benchmark",
    "make_step",
    "measure",
    "planner_calibration",
    "saved_activation_bytes",
    "wrapper_overhead",
]
