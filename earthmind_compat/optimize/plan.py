"""Memory planner: weights, gradients, optimizer state and activations of a backbone, and whether it fits.

- Weights, gradients and optimizer state are counted exactly from the backbone built on the meta device
  (no memory used, any preset): each linear layer and MoE expert slice is counted as bitsandbytes stores it
  (packed 4-bit codes + absmax per 64 weights [+ nested scales with dq] + code table, or int8 + row scales).
- Activations are traced: one block of each kind is materialised at the real width, the technique is
  applied to it, and the bytes autograd saves for the backward pass are counted (``saved_tensors_hooks``)
  at three token counts; a per-sequence cost ``b * n + c * n**2`` is fitted (``c`` is the attention matrix
  where the installed torch's attention keeps one, e.g. torch 2.7's CPU fallback for Granite's masked
  attention), scaled to the requested batch and image size and summed over the blocks, plus the stem
  (input, embeddings) and one block's worth of backward workspace. With checkpointing, each block keeps
  only its input and one block at a time is recomputed.

:func:`measure_activation_peak` measures the real peak on CPU with the PyTorch profiler's allocator events
and is what the estimate is validated against.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from earthmind_compat.backbones import backbone_class
from earthmind_compat.errors import ConfigurationError, unknown_name
from earthmind_compat.optimize.experts import expert_weights, quantize_experts
from earthmind_compat.optimize.families import find_blocks, linear_paths, lora_targets
from earthmind_compat.optimize.quantize import BLOCKSIZE_4BIT, weight_storages
from earthmind_compat.optimize.techniques import Techniques, parse_technique
from earthmind_compat.sizes import parse_size

#: Optimizer state bytes per trainable parameter (fp32 states).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd": 0, "sgd_momentum": 4}
_NESTED_BLOCKSIZE = 256


@dataclass
class MemoryPlan:
    """Memory estimate of one training configuration, in bytes.

    ``weights`` is what the technique stores (quantized codes and scales included); ``unoptimized_weights`` is
    the same backbone in full precision, for the ratio the technique buys.
    """

    backbone: str
    preset: str
    technique: str
    batch_size: int
    image_size: int
    parameters: int
    weights: int
    unoptimized_weights: int
    gradients: int
    optimizer: int
    activations: int
    total: int
    gpu_memory: int | None
    fits: bool | None

    def as_dict(self) -> dict:
        """Plain dictionary (for JSON)."""
        return asdict(self)


def quantized_weight_bytes(out_features: int, in_features: int, quantization: str, double_quant: bool) -> int:
    """Bytes bitsandbytes holds in memory for one quantized ``[out, in]`` weight (bias not included)."""
    n = out_features * in_features
    if quantization == "int8":
        return n + 4 * out_features  # int8 codes + one float32 scale per row
    blocks = math.ceil(n / BLOCKSIZE_4BIT)
    size = math.ceil(n / 2) + 16 * 4  # packed codes + the 16-entry code table
    if double_quant:
        size += blocks + 4 * math.ceil(blocks / _NESTED_BLOCKSIZE) + 256 * 4 + 4  # uint8 absmax + nested + offset
    else:
        size += 4 * blocks
    return size


def _lora_params(backbone: nn.Module, techniques: Techniques, r: int) -> int:
    if not techniques.lora:
        return 0
    targets = set(lora_targets(backbone))
    total = 0
    for path, module in backbone.named_modules():
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in targets and ".experts." not in path:
            total += r * (module.in_features + module.out_features)
    return total


def count_weights(backbone: nn.Module, techniques: Techniques, lora_r: int = 8) -> dict[str, int]:
    """Exact weight bytes and parameter counts of ``backbone`` (built on any device) under ``techniques``.

    Returns:
        ``{"weights": bytes, "parameters": n, "trainable": n}``.
    """
    quant = techniques.quantization
    counted: set[int] = set()
    weights = params = frozen = 0
    for module in backbone.modules():
        if quant and type(module) is nn.Linear:
            w = module.weight
            weights += quantized_weight_bytes(w.shape[0], w.shape[1], quant, techniques.double_quant)
            params += w.numel()
            frozen += w.numel()
            counted.add(id(w))
        elif quant and expert_weights(module):  # MoE stacks of either transformers layout
            for stack in expert_weights(module):
                per = quantized_weight_bytes(stack.shape[1], stack.shape[2], quant, techniques.double_quant)
                weights += per * stack.shape[0]
                params += stack.numel()
                frozen += stack.numel()
                counted.add(id(stack))
    for p in backbone.parameters():
        if id(p) not in counted:
            weights += p.numel() * p.element_size()
            params += p.numel()
            if techniques.lora:
                frozen += p.numel()
    lora = _lora_params(backbone, techniques, lora_r)
    weights += 4 * lora
    if techniques.lora:  # LoRA keeps the backbone's freshly initialised modules trainable
        frozen -= sum(
            p.numel()
            for name in getattr(backbone, "new_modules", ())
            for p in backbone.get_submodule(name).parameters()
        )
    return {"weights": weights, "parameters": params + lora, "trainable": params - frozen + lora}


def build_on_meta(backbone_name: str, preset: str, in_chans: int = 3, **backbone_kwargs: object) -> nn.Module:
    """Build a backbone by name on the meta device (no memory, any size), with more constructor arguments if given.

    Raises:
        UnknownNameError: for a name that is not one of ours, or an unknown preset.
    """
    with torch.device("meta"):
        return backbone_class(backbone_name)(preset=preset, in_chans=in_chans, **backbone_kwargs)


def _block_kind(block: nn.Module) -> tuple:
    return (type(block).__name__, tuple(sorted({type(m).__name__ for m in block.children() if m is not None})))


def _materialise(block: nn.Module) -> nn.Module:
    block = copy.deepcopy(block).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
        for b in block.buffers():
            b.zero_()
    return block


def saved_bytes(fn: Callable[[], object], exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward while running ``fn()``.

    Each storage is counted once, however many saved tensors view it; storages in ``exclude`` (data pointers,
    e.g. :func:`~earthmind_compat.optimize.quantize.weight_storages`: the weights, which are not activations)
    and tensors without storage (meta, sparse) are not counted. The benchmarks measure with the same rule.
    """
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout == torch.strided and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in exclude:
                storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def block_saved_bytes_growth(
    block: nn.Module,
    hidden_size: int,
    techniques: Techniques,
    tokens: int,
    lora_target_names: tuple[str, ...] = (),
) -> tuple[float, float]:
    """How the saved-for-backward bytes of one materialised block grow with the sequence length ``n``.

    Measured at ``n = tokens, 2 * tokens, 3 * tokens`` on one sequence and fitted exactly by
    ``a + b * n + c * n**2``.

    Returns:
        ``(b, c)``: bytes per token and per squared token (``c`` is clamped at 0: measurement noise only).
    """
    block = _materialise(block)
    if techniques.quantization:
        # A bitsandbytes matmul saves its input for the backward pass like a trainable nn.Linear does (a frozen
        # nn.Linear would not), so quantized layers are emulated by full-precision ones whose weight requires
        # grad; the weights themselves are never counted. Experts are split per expert, as when quantized.
        quantize_experts(block, None)
        for p in block.parameters():
            p.requires_grad_(False)
        for module in block.modules():
            if type(module) is nn.Linear:
                module.weight.requires_grad_(True)
    elif not techniques.trains_base:
        for p in block.parameters():
            p.requires_grad_(False)
    if techniques.lora:
        from peft import LoraConfig, inject_adapter_in_model

        targets = linear_paths(block, lora_target_names)
        if targets:
            inject_adapter_in_model(LoraConfig(r=8, target_modules=targets), block)
    block.train()
    exclude = weight_storages(block)
    counts = []
    for n in (tokens, 2 * tokens, 3 * tokens):
        hidden = torch.randn(1, n, hidden_size, requires_grad=True)

        def run(hidden=hidden) -> None:
            out = block(hidden)
            (out[0] if isinstance(out, tuple) else out).sum()

        counts.append(saved_bytes(run, exclude | {hidden.untyped_storage().data_ptr()}))
    first, second = counts[1] - counts[0], counts[2] - counts[1]
    quadratic = max(0.0, (second - first) / (2 * tokens**2))
    return (first - 3 * quadratic * tokens**2) / tokens, quadratic


def estimate_activations(
    backbone: nn.Module,
    techniques: Techniques,
    batch_size: int,
    image_size: int,
    tokens: int = 64,
) -> int:
    """Estimated peak activation bytes of one training step of ``backbone`` (fp32), see the module docstring."""
    targets = tuple(lora_targets(backbone)) if techniques.lora else ()
    blocks = find_blocks(backbone)
    # the width of the stem's tokens: a backbone whose first feature may be another width says it (token_width)
    hidden = int(getattr(backbone, "token_width", 0) or getattr(backbone, "out_channels", [0])[0])
    chunk = int(getattr(getattr(backbone, "config", None), "mamba_chunk_size", 0) or 0)
    if chunk:
        tokens = chunk  # whole Mamba chunks
    rows, cols = backbone.grid_size(image_size, image_size)
    n = rows * cols + int(getattr(backbone, "has_cls_token", False))
    growth: dict[tuple, tuple[float, float]] = {}
    per_block, kept = [], 0
    for block in blocks:
        # blocks of another width reading fewer tokens (language layers after the projector) say so themselves
        width, m = int(getattr(block, "hidden_size", hidden)), n * float(getattr(block, "token_scale", 1.0))
        kind = (_block_kind(block), width)
        if kind not in growth:
            growth[kind] = block_saved_bytes_growth(block, width, techniques, tokens, targets)
        linear, quadratic = growth[kind]
        per_block.append(batch_size * (linear * m + quadratic * m * m))
        kept += 4 * batch_size * m * width
    tokens_total = batch_size * n
    largest = max(per_block)
    stem = 2 * 4 * tokens_total * hidden  # embeddings (the input batch itself is not counted)
    if techniques.checkpointing:
        return int(stem + kept + 2 * largest)
    return int(stem + sum(per_block) + largest)


def plan_memory(
    backbone: str,
    preset: str = "full",
    technique: str | Techniques | None = None,
    batch_size: int = 1,
    image_size: int = 224,
    gpu_memory: str | int | None = None,
    optimizer: str = "adamw",
    in_chans: int = 3,
    lora_r: int = 8,
    **backbone_kwargs: object,
) -> MemoryPlan:
    """Plan the training memory of a backbone configuration.

    Args:
        backbone: Registered backbone name.
        preset: Preset name (``full`` for the published size).
        technique: Technique string, e.g. ``"nf4+lora+ckpt"``.
        batch_size: Images per step.
        image_size: Image side in pixels.
        gpu_memory: Device memory, e.g. ``"24GiB"``; with it, ``fits`` is decided.
        optimizer: ``adamw``, ``adam``, ``sgd`` or ``sgd_momentum``.
        in_chans: Input bands.
        lora_r: LoRA rank.
        **backbone_kwargs: More constructor arguments of the backbone (e.g. ``language_layers=4``).

    Returns:
        A :class:`MemoryPlan` (activations in float32, as on CPU; bfloat16 autocast roughly halves them).

    Raises:
        UnknownNameError: for an unknown backbone, preset, technique or optimizer.
        ConfigurationError: for non-positive sizes.
    """
    techniques = parse_technique(technique)
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise unknown_name("optimizer", optimizer, OPTIMIZER_STATE_BYTES)
    if batch_size < 1 or image_size < 1:
        raise ConfigurationError(f"batch size and image size must be positive, got {batch_size} and {image_size}.")
    device_memory = parse_size(gpu_memory)
    model = build_on_meta(backbone, preset, in_chans, **backbone_kwargs)
    counts = count_weights(model, techniques, lora_r)
    unoptimized = count_weights(model, parse_technique("none"))["weights"]
    gradients = 4 * counts["trainable"]
    optimizer_bytes = OPTIMIZER_STATE_BYTES[optimizer] * counts["trainable"]
    activations = estimate_activations(model, techniques, batch_size, image_size)
    total = counts["weights"] + gradients + optimizer_bytes + activations
    return MemoryPlan(
        backbone,
        preset,
        techniques.name,
        batch_size,
        image_size,
        counts["parameters"],
        counts["weights"],
        unoptimized,
        gradients,
        optimizer_bytes,
        activations,
        total,
        device_memory,
        None if device_memory is None else total <= device_memory,
    )


def measure_activation_peak(backbone: nn.Module, x: torch.Tensor) -> int:
    """Measured peak bytes allocated on CPU during one forward + backward, above what existed before.

    Gradient buffers are allocated by a warm-up step first (and zeroed, not freed), so the peak is the
    activations plus backward workspace, as the planner's activation figure. Measured with the PyTorch
    profiler's allocator events (``profile_memory=True``): the running sum of allocations and frees.
    """
    from torch.profiler import ProfilerActivity, profile

    backbone.train()

    def step() -> None:
        features = backbone(x)
        sum(f.float().mean() for f in features).backward()

    step()
    for p in backbone.parameters():
        if p.grad is not None:
            p.grad.zero_()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    running = peak = 0
    for event in memory:
        if event["args"].get("Device Type", 0) == 0:
            running += int(event["args"]["Bytes"])
            peak = max(peak, running)
    return peak
