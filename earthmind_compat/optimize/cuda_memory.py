"""What a CUDA device holds beyond the tensors a training step allocates: the planner's ``--device cuda`` terms.

The planner's weights, gradients, optimizer state and activations are bytes *allocated*, what
``torch.cuda.max_memory_allocated`` reports. ``nvidia-smi`` and an out-of-memory error see more:

- **CUDA context** (:data:`CUDA_CONTEXT_BYTES`): the driver's per-process state and the loaded kernels. It is
  never reported by ``torch.cuda.memory_allocated`` / ``memory_reserved`` (PyTorch's "CUDA semantics" notes,
  memory management). Its size depends on the GPU, driver and libraries; with lazy module loading
  (``CUDA_MODULE_LOADING=LAZY``, PyTorch's default since CUDA 11.7) it is a few hundred MiB. The planner takes
  512 MiB, an assumption until a GPU run of ``nox -s gpu_benchmarks`` measures it
  (``torch.cuda.mem_get_info`` before and after the first allocation, ``cuda_context_bytes`` in the JSON).
- **cuBLAS workspaces** (:func:`cublas_workspace_bytes`): ATen gives each cuBLAS handle a workspace from the
  caching allocator (``aten/src/ATen/cuda/CublasHandlePool.cpp``, ``parseChosenWorkspaceSize``): 32 MiB on
  compute capability 9.x, 10.x and 12.x, else ``4096 KiB * 2 + 16 KiB * 8`` (8.125 MiB), or what
  ``CUBLAS_WORKSPACE_CONFIG`` says. A training step uses two handles (the forward's thread and autograd's
  backward thread). Already inside ``max_memory_allocated``; counted here because the CPU trace has no
  cuBLAS.
- **Caching-allocator reserve** (:data:`ALLOCATOR_RESERVE_FRACTION`): ``memory_reserved`` exceeds
  ``memory_allocated`` by the rounding and splitting of cached segments (``c10/cuda/CUDACachingAllocator.cpp``:
  sizes rounded to 512 bytes; requests under 1 MiB carved from 2 MiB segments, 1-10 MiB from 20 MiB segments,
  larger ones rounded to 2 MiB) and by freed blocks kept for reuse that a later, larger request cannot use
  (fragmentation). The planner adds one 20 MiB segment plus 10 % of the allocated peak, an assumption to be
  calibrated by the same GPU run (``max_memory_reserved / max_memory_allocated`` in the JSON).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from earthmind_compat.errors import ConfigurationError

#: Assumed CUDA context (driver state and lazily loaded kernels), see the module docstring.
CUDA_CONTEXT_BYTES = 512 * 2**20
#: Share of the allocated peak assumed lost to the caching allocator's rounding and fragmentation.
ALLOCATOR_RESERVE_FRACTION = 0.10
#: One large segment of the caching allocator (``kLargeBuffer``), held whatever the model.
ALLOCATOR_LARGE_SEGMENT = 20 * 2**20
#: ATen's default cuBLAS workspace per handle before compute capability 9 (``:4096:2:16:8``).
CUBLAS_WORKSPACE_DEFAULT = 4096 * 1024 * 2 + 16 * 1024 * 8
#: ATen's default cuBLAS workspace per handle on compute capability 9.x, 10.x and 12.x.
CUBLAS_WORKSPACE_LARGE = 4096 * 8 * 1024
#: cuBLAS handles in a training step: the forward's thread and autograd's backward thread.
TRAINING_CUBLAS_HANDLES = 2

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class CudaTerms:
    """Bytes a CUDA device holds beyond the step's allocated tensors.

    Attributes:
        context: CUDA context and loaded kernels.
        cublas_workspace: cuBLAS workspaces of the step's handles.
        allocator_reserve: The caching allocator's rounding and fragmentation above the allocated peak.
    """

    context: int
    cublas_workspace: int
    allocator_reserve: int

    @property
    def total(self) -> int:
        """All three terms."""
        return self.context + self.cublas_workspace + self.allocator_reserve


def cublas_workspace_bytes(capability_major: int | None = None, config: str | None = None) -> int:
    """Bytes of one cuBLAS handle's workspace, as ATen chooses it.

    Args:
        capability_major: The GPU's compute capability major version; ``None`` (unknown) takes the larger
            default, so the plan is not below what the GPU will use.
        config: ``CUBLAS_WORKSPACE_CONFIG`` (``":SIZE_KiB:COUNT"`` pairs); ``None`` reads the environment.

    Raises:
        ConfigurationError: if ``config`` is set but holds no ``:SIZE:COUNT`` pair.
    """
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG") if config is None else config
    if config:
        pairs = re.findall(r":(\d+):(\d+)", config)
        if not pairs:
            raise ConfigurationError(
                f"CUBLAS_WORKSPACE_CONFIG={config!r} holds no ':SIZE_KiB:COUNT' pair (e.g. ':4096:8'); fix or unset it."
            )
        return sum(int(size) * 1024 * int(count) for size, count in pairs)
    if capability_major is None or capability_major in (9, 10, 12):
        return CUBLAS_WORKSPACE_LARGE
    return CUBLAS_WORKSPACE_DEFAULT


def cuda_terms(allocated_peak: int, capability_major: int | None = None) -> CudaTerms:
    """The CUDA terms for a training step whose tensors peak at ``allocated_peak`` bytes (see the module docstring).

    Args:
        allocated_peak: The plan's total without these terms (weights, gradients, optimizer state,
            activations, strategy workspace).
        capability_major: The GPU's compute capability major version, if known.
    """
    workspace = TRAINING_CUBLAS_HANDLES * cublas_workspace_bytes(capability_major)
    reserve = ALLOCATOR_LARGE_SEGMENT + int(ALLOCATOR_RESERVE_FRACTION * (allocated_peak + workspace))
    return CudaTerms(CUDA_CONTEXT_BYTES, workspace, reserve)


def check_device(device: object) -> str:
    """Validate the planner's ``device`` argument.

    Raises:
        ConfigurationError: if it is not ``"cpu"`` or ``"cuda"``.
    """
    if not isinstance(device, str) or device not in DEVICES:
        raise ConfigurationError(f"device must be one of {DEVICES}, got {device!r}.")
    return device
