"""Memory planner: weights, gradients, optimizer state and activations of a backbone, and whether it fits.

- Weights, gradients and optimizer state are counted exactly from the backbone built on the meta device
  (no memory used, any preset): each linear layer and MoE expert slice is counted as bitsandbytes stores it
  (packed 4-bit codes + absmax per 64 weights [+ nested scales with dq] + code table, or int8 + row scales).
- Activations are traced, never derived from a formula. Around the blocks (:func:`trace_skeleton`): the backbone
  with every block replaced by a stand-in that keeps its input, materialised and run for 1 and 2 images,
  gives what the stem and the feature handling keep (e.g. EarthMind's concatenation of its modalities copies
  the tokens and each feature), the features' gradients, the stem's own backward, and each block's input:
  its sequences, tokens, width and memory layout (Granite's patch embedding hands its blocks transposed
  tokens, and a block fed those copies them where it reshapes them: one more token tensor per Mamba block,
  three per attention block). Each block (:func:`block_growth`): one block of each kind is materialised at
  the real width, the technique is applied to it (real bitsandbytes layers, real LoRA adapters of the
  planned rank, torch's non-reentrant checkpoint around it), and it is run on an input of that shape and
  layout for 1 and 2 sequences under the PyTorch profiler's allocator events. What its forward leaves
  allocated (``kept``: output and everything kept for backward, including what bitsandbytes keeps outside
  the saved-tensor hooks, which checkpointing does not drop), its forward's own peak (``forward``: weights
  bitsandbytes dequantizes, expert intermediates) and its backward's peak above what it kept (``workspace``:
  output and input gradients, attention's transient gradients, a weight-sized gradient before
  accumulation, with checkpointing the recomputed forward) are each ``a + b * batch``. The estimate is the
  largest of three moments: a block's forward with the blocks below it holding what they keep; a block's
  backward (its workspace, the features' gradients, what the blocks below it keep, and of the blocks above it,
  whose backward has run, their outputs returned as features and what their autograd context still holds:
  ``retained``, e.g. bitsandbytes' inputs, released only with the graph); the stem's backward.
- Per-device figures for DDP, FSDP and ZeRO-3: :mod:`earthmind_compat.optimize.sharding`.
- ``device="cuda"`` adds what a CUDA device holds beyond the allocated tensors (context, cuBLAS workspaces,
  the caching allocator's reserve): :mod:`earthmind_compat.optimize.cuda_memory`.
- With a memory size, the largest batch that fits is found from the same trace (every term is a piecewise
  linear function of the batch, so no second trace is needed).

:func:`measure_activation_peak` measures the real peak on CPU with the PyTorch profiler's allocator events
and is what the estimate is validated against.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from earthmind_compat.backbones import backbone_class
from earthmind_compat.errors import ConfigurationError, unknown_name
from earthmind_compat.optimize.checkpointing import check_granularity, chosen_blocks
from earthmind_compat.optimize.cuda_memory import CudaTerms, check_device, cuda_terms
from earthmind_compat.optimize.experts import expert_weights, quantize_experts
from earthmind_compat.optimize.families import find_blocks, linear_paths, lora_targets, replace_blocks
from earthmind_compat.optimize.quantize import BLOCKSIZE_4BIT, quantize_linears
from earthmind_compat.optimize.sharding import device_states
from earthmind_compat.optimize.techniques import Techniques, parse_technique
from earthmind_compat.sizes import parse_size

#: Optimizer state bytes per trainable parameter (fp32 states).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd": 0, "sgd_momentum": 4}
#: Bytes of the step counter that Adam and AdamW keep per trainable tensor (a float32 scalar tensor).
OPTIMIZER_STEP_BYTES = {"adamw": 4, "adam": 4, "sgd": 0, "sgd_momentum": 0}
_NESTED_BLOCKSIZE = 256


@dataclass
class MemoryPlan:
    """Memory estimate of one training configuration, in bytes.

    ``weights`` is what the technique stores (quantized codes and scales included); ``unoptimized_weights`` is
    the same backbone in full precision, for the ratio the technique buys. With a multi-device ``strategy``,
    ``weights``, ``gradients``, ``optimizer``, ``activations`` and ``workspace`` (DDP's gradient buckets, the
    layers FSDP / ZeRO-3 gather) are per device, and ``total`` is one device's. With ``device="cuda"``,
    ``cuda_context``, ``cuda_workspace`` (cuBLAS) and ``allocator_reserve`` are part of ``total``
    (:mod:`earthmind_compat.optimize.cuda_memory`). ``largest_batch`` is the largest batch per device whose total
    fits ``gpu_memory`` (0: not even one image; ``None`` without a memory size).
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
    strategy: str = "single"
    devices: int = 1
    workspace: int = 0
    device: str = "cpu"
    cuda_context: int = 0
    cuda_workspace: int = 0
    allocator_reserve: int = 0
    largest_batch: int | None = None

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


def _lora_params(backbone: nn.Module, techniques: Techniques, r: int, target_modules: tuple[str, ...] | None) -> int:
    if not techniques.lora:
        return 0
    targets = set(target_modules or lora_targets(backbone))
    total = 0
    for path, module in backbone.named_modules():
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in targets and ".experts." not in path:
            total += r * (module.in_features + module.out_features)
    return total


def count_weights(
    backbone: nn.Module,
    techniques: Techniques,
    lora_r: int = 8,
    lora_target_modules: tuple[str, ...] | None = None,
) -> dict[str, int]:
    """Exact weight bytes and parameter counts of ``backbone`` (built on any device) under ``techniques``.

    LoRA adapts ``lora_target_modules`` (module names, matched as the last part of a linear layer's path), by
    default the backbone's own (:func:`~earthmind_compat.optimize.families.lora_targets`).

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
    lora = _lora_params(backbone, techniques, lora_r, lora_target_modules)
    weights += 4 * lora
    if techniques.lora:  # LoRA keeps the backbone's freshly initialised modules trainable
        frozen -= sum(
            p.numel()
            for name in getattr(backbone, "new_modules", ())
            for p in backbone.get_submodule(name).parameters()
        )
    return {"weights": weights, "parameters": params + lora, "trainable": params - frozen + lora}


def count_trainable_tensors(
    backbone: nn.Module, techniques: Techniques, lora_target_modules: tuple[str, ...] | None = None
) -> int:
    """Trainable parameter tensors of ``backbone`` under ``techniques`` (an optimizer keeps a step counter per tensor).

    Without LoRA: every parameter but the quantized weights; with LoRA: two adapter matrices per adapted linear
    layer and the parameters of the backbone's freshly initialised modules.
    """
    if techniques.lora:
        targets = set(lora_target_modules or lora_targets(backbone))
        adapted = sum(
            1
            for path, module in backbone.named_modules()
            if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in targets and ".experts." not in path
        )
        fresh = sum(
            1 for name in getattr(backbone, "new_modules", ()) for _ in backbone.get_submodule(name).parameters()
        )
        return 2 * adapted + fresh
    quantized: set[int] = set()
    if techniques.quantization:
        for module in backbone.modules():
            if type(module) is nn.Linear:
                quantized.add(id(module.weight))
            quantized.update(id(stack) for stack in expert_weights(module))
    return sum(1 for p in backbone.parameters() if id(p) not in quantized)


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


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send what native code writes to file descriptor 2 to /dev/null, for the duration of the block.

    The profiler's native layer (Kineto) logs each start and stop, and a failed GPU probe as ``ERROR``, straight
    to file descriptor 2 on a CPU-only machine: a plan would print dozens of such lines. Python exceptions still
    propagate; Python's own stderr is flushed before and after.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (a detached process): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _profiled(fn: Callable[[], object]) -> tuple[int, int]:
    """``(peak, final)`` bytes allocated on CPU while running ``fn()``, above what was allocated before it.

    Read from the PyTorch profiler's allocator events (``profile_memory=True``): the running sum of every
    allocation and free, in order; ``final`` is what ``fn`` left allocated. CPU memory measured this way does
    not depend on other processes.
    """
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
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
    return peak, running


def profiled_peak(fn: Callable[[], object]) -> int:
    """Peak bytes allocated on CPU while running ``fn()``, above what was allocated before it (see ``_profiled``)."""
    return _profiled(fn)[0]


@dataclass(frozen=True)
class BlockGrowth:
    """One block's training memory at the planned sequence length, as ``a + b * batch`` bytes.

    Attributes:
        kept: What the block's forward leaves allocated: its output and everything kept for its backward (saved
            tensors, and what bitsandbytes keeps on its autograd context outside the saved-tensor hooks).
        workspace: The block's backward peak above what its forward kept: the output gradient, the input
            gradient, the transient gradients of attention and MLP (the attention's probabilities where the
            installed torch's kernel materialises them), a weight-sized gradient before it is accumulated, the
            weights bitsandbytes dequantizes for the backward.
        forward: The forward's own peak above what existed before it.
        retained: What the block still holds after its backward, its output aside, while the step's autograd
            graph lives (until the whole backward ends): tensors bitsandbytes keeps on its autograd context
            outside the saved-tensor hooks, which autograd does not release after the node ran.
    """

    kept: tuple[float, float]
    workspace: tuple[float, float]
    forward: tuple[float, float] = (0.0, 0.0)
    retained: tuple[float, float] = (0.0, 0.0)

    def forward_bytes(self, batch: int) -> float:
        """The forward's peak at ``batch`` sequences (above what existed before it)."""
        return max(0.0, self.forward[0] + self.forward[1] * batch)

    def kept_bytes(self, batch: int) -> float:
        """Kept bytes at ``batch`` sequences."""
        return max(0.0, self.kept[0] + self.kept[1] * batch)

    def workspace_bytes(self, batch: int) -> float:
        """Backward workspace at ``batch`` sequences."""
        return max(0.0, self.workspace[0] + self.workspace[1] * batch)

    def retained_bytes(self, batch: int) -> float:
        """Bytes held past the block's backward (its output aside) at ``batch`` sequences."""
        return max(0.0, self.retained[0] + self.retained[1] * batch)


def _line(at_one: int, at_two: int) -> tuple[float, float]:
    """``(a, b)`` of ``a + b * batch`` through the values at batch 1 and 2."""
    return float(2 * at_one - at_two), float(at_two - at_one)


def _prepare_block(
    block: nn.Module, techniques: Techniques, lora_target_names: tuple[str, ...], lora_r: int
) -> nn.Module:
    """A materialised copy of ``block`` with the technique's quantization and LoRA applied, as in the backbone."""
    block = _materialise(block)
    if techniques.quantization:
        quantize_linears(block, techniques.quantization, techniques.double_quant)
        quantize_experts(block, techniques.quantization, techniques.double_quant)
    if techniques.lora:
        from peft import LoraConfig, inject_adapter_in_model

        for p in block.parameters():
            p.requires_grad_(False)
        targets = linear_paths(block, lora_target_names)
        if targets:
            inject_adapter_in_model(LoraConfig(r=lora_r, target_modules=targets), block)
            for name, p in block.named_parameters():
                p.requires_grad_("lora_" in name)
    return block.train()


def block_growth(
    block: nn.Module,
    hidden_size: int,
    techniques: Techniques,
    tokens: int,
    lora_target_names: tuple[str, ...] = (),
    lora_r: int = 8,
    layout: tuple[int, ...] = (0, 1, 2),
) -> BlockGrowth:
    """Trace one block at its real width and sequence length: what its forward keeps, its backward's peak.

    The block is materialised, quantized and given LoRA adapters as the technique does to the backbone. For 1 and
    2 sequences of ``tokens`` tokens, after a warm-up step that allocates the parameter gradients (zeroed, not
    freed: they are counted as gradients), the forward and the backward are profiled separately
    (:func:`_profiled`): what the forward leaves allocated is ``kept``, the backward's peak above it is
    ``workspace``. The backward gets a real output gradient (a fixed random direction), as from the layers above.
    The block's input has the memory ``layout`` the backbone gives its blocks (dimensions from the outermost to
    the innermost, :func:`_layout`): a block fed transposed tokens copies them where it reshapes them.
    """
    block = _prepare_block(block, techniques, lora_target_names, lora_r)
    kept, workspace, peak, retained = [], [], [], []
    for batch in (1, 2):
        shape = (batch, tokens, hidden_size)
        inverse = sorted(range(3), key=layout.__getitem__)
        hidden = torch.randn([shape[d] for d in layout]).permute(inverse).requires_grad_()
        direction = torch.randn(batch, tokens, hidden_size)
        outputs: list[torch.Tensor] = []

        def forward(hidden: torch.Tensor = hidden, outputs: list[torch.Tensor] = outputs) -> None:
            out = checkpoint(block, hidden, use_reentrant=False) if techniques.checkpointing else block(hidden)
            outputs.append(out[0] if isinstance(out, tuple) else out)

        graph: list[torch.Tensor] = []

        def backward(
            direction: torch.Tensor = direction, outputs: list[torch.Tensor] = outputs, graph: list = graph
        ) -> None:
            loss = (outputs.pop() * direction).sum()
            loss.backward()
            graph.append(loss)  # the step's graph outlives each block's backward (the loss holds it)

        forward()  # warm-up: parameter gradients exist from here on
        backward()
        graph.clear()
        for p in block.parameters():
            if p.grad is not None:
                p.grad.zero_()
        hidden.grad = None
        forward_peak, forward_kept = _profiled(forward)
        kept.append(forward_kept)
        peak.append(forward_peak)
        backward_peak, backward_final = _profiled(backward)
        workspace.append(backward_peak)
        input_gradient = hidden.grad.untyped_storage().nbytes() if hidden.grad is not None else 0
        retained.append(forward_kept + backward_final - input_gradient)
        graph.clear()
    return BlockGrowth(_line(*kept), _line(*workspace), _line(*peak), _line(*retained))


def _layout(tensor: torch.Tensor) -> tuple[int, ...]:
    """The dimensions of ``tensor`` from the outermost (largest stride) to the innermost in memory."""
    return tuple(sorted(range(tensor.ndim), key=lambda d: (-tensor.stride(d), d)))


class _KeepInput(torch.autograd.Function):
    """What a stand-in block does: keep its input for the backward and return a fresh tensor of the same layout."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hidden)
        return hidden.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _StandIn(nn.Module):
    """Takes a block's place in the skeleton (:func:`trace_skeleton`) and records the block's input."""

    def __init__(self, record: list[tuple[torch.Size, tuple[int, ...], int]]) -> None:
        super().__init__()
        self.record = record

    def forward(self, hidden: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        out = _KeepInput.apply(hidden)
        self.record.append((hidden.shape, _layout(hidden), out.untyped_storage().data_ptr()))
        return out


@dataclass(frozen=True)
class Skeleton:
    """What the backbone needs around its blocks, measured with every block replaced by a stand-in.

    Attributes:
        kept: Bytes the forward leaves allocated besides the blocks' own (``a + b * batch``): the stem's output
            (kept by the first block), whatever the backbone keeps or copies for its features (e.g. a
            concatenation of one modality), every feature a copy rather than a block's output.
        gradients: The features' gradients (``a + b * batch``): they arrive together when the backward starts
            and wait for their block's backward, on top of everything the forward kept.
        backward: The skeleton's backward peak above what it kept (``a + b * batch``): the features' gradients and
            the stem's backward (e.g. a patch convolution's), which runs after every block has freed its memory.
        inputs: Per block that runs, its input's shape at batch 1 and its memory layout (:func:`_layout`).
        features: Per block that runs, whether its output is returned as a feature (it then stays allocated
            until the step ends, after the block's backward freed the rest of what the block kept).
    """

    kept: tuple[float, float]
    gradients: tuple[float, float]
    backward: tuple[float, float]
    inputs: tuple[tuple[torch.Size, tuple[int, ...]], ...]
    features: tuple[bool, ...] = ()

    def at(self, batch: int) -> tuple[float, float, float]:
        """``(kept, gradients, backward)`` bytes at ``batch`` images."""
        return tuple(a + b * batch for a, b in (self.kept, self.gradients, self.backward))


def trace_skeleton(backbone: nn.Module, image_size: int, in_chans: int) -> Skeleton:
    """Measure everything of one training step but the blocks: the stem, the features, their gradients.

    A copy of ``backbone`` (built on any device) has its blocks replaced by stand-ins that keep their input and
    return a fresh tensor of its layout, as a block does; the rest is materialised on CPU. One step at 1 and 2
    images is profiled like :func:`measure_activation_peak`, forward and backward apart; the stand-ins'
    outputs still allocated after the forward are a block's output and are taken off (:func:`block_growth`
    counts them).
    """
    skeleton = copy.deepcopy(backbone)
    record: list[tuple[torch.Size, tuple[int, ...], int]] = []
    replace_blocks(skeleton, lambda block: _StandIn(record))
    skeleton = _materialise(skeleton).train()
    for module in skeleton.modules():  # the copy made its own list: record into ours
        if isinstance(module, _StandIn):
            module.record = record
    kept_at, gradients_at, backward_at = [], [], []
    inputs: tuple[tuple[torch.Size, tuple[int, ...]], ...] = ()
    returned: tuple[bool, ...] = ()
    for batch in (1, 2):
        x = torch.randn(batch, in_chans, image_size, image_size)
        generator = torch.Generator().manual_seed(0)
        directions: list[torch.Tensor] = []
        features: list[torch.Tensor] = []

        def forward(x: torch.Tensor = x, features: list[torch.Tensor] = features) -> None:
            record.clear()
            features.extend(skeleton(x))

        def backward(
            features: list[torch.Tensor] = features,
            directions: list[torch.Tensor] = directions,
            generator: torch.Generator = generator,
        ) -> None:
            if not directions:
                directions.extend(torch.randn(f.shape, generator=generator, dtype=f.dtype) for f in features)
            sum((f * d).sum() for f, d in zip(features, directions, strict=True)).backward()
            features.clear()

        forward()
        backward()
        for p in skeleton.parameters():
            if p.grad is not None:
                p.grad.zero_()
        final = _profiled(forward)[1]
        alive = {f.untyped_storage().data_ptr() for f in features}
        # every stand-in's output but the last is kept by the next one; the last one only if it is a feature
        outputs = [math.prod(shape) * 4 for shape, _, _ in record]
        final -= sum(outputs[:-1]) + (outputs[-1] if record[-1][2] in alive else 0)
        kept_at.append(final)
        gradients_at.append(sum(f.numel() * f.element_size() for f in features))
        backward_at.append(_profiled(backward)[0])
        if batch == 1:
            inputs = tuple((shape, layout) for shape, layout, _ in record)
            returned = tuple(pointer in alive for _, _, pointer in record)
    return Skeleton(_line(*kept_at), _line(*gradients_at), _line(*backward_at), inputs, returned)


@dataclass(frozen=True)
class ActivationTrace:
    """A backbone's traced activation memory under one technique and image size, for any batch.

    Attributes:
        skeleton: Everything around the blocks (:func:`trace_skeleton`).
        blocks: Per block that runs, its traced growth and its sequences per image.
    """

    skeleton: Skeleton
    blocks: tuple[tuple[BlockGrowth, int], ...]

    def at(self, batch: int) -> int:
        """Estimated peak activation bytes of one training step at ``batch`` images (see the module docstring)."""
        kinds = [(growth, sequences * batch) for growth, sequences in self.blocks]
        kept, gradients, stem_backward = self.skeleton.at(batch)
        left = [g.kept_bytes(n) for g, n in kinds]  # with checkpointing: the output and what bitsandbytes holds
        # what a block above keeps once its backward ran: what its autograd context holds past the backward, and
        # its output if that is a feature (the caller holds it)
        returned = self.skeleton.features or (True,) * len(kinds)
        outputs = [math.prod(shape) * 4 * batch for shape, _ in self.skeleton.inputs]
        after = [
            g.retained_bytes(n) + (o if r else 0.0) for (g, n), o, r in zip(kinds, outputs, returned, strict=False)
        ]
        # the peak is in a block's forward (the blocks below it keep theirs), in a block's backward (the features'
        # gradients, which arrive together when the backward starts, an upper bound; the blocks below it keep
        # theirs, the blocks above it what they still hold) or in the stem's backward, after the blocks freed theirs
        forward_peak = max(sum(left[:i]) + g.forward_bytes(n) for i, (g, n) in enumerate(kinds))
        backward_peak = gradients + max(
            sum(left[: i + 1]) + sum(after[i + 1 :]) + g.workspace_bytes(n) for i, (g, n) in enumerate(kinds)
        )
        return int(kept + max(forward_peak, backward_peak, stem_backward))


def trace_activations(
    backbone: nn.Module,
    techniques: Techniques,
    image_size: int,
    lora_r: int = 8,
    lora_target_modules: tuple[str, ...] | None = None,
    in_chans: int = 3,
    checkpoint_every: int = 1,
) -> ActivationTrace:
    """Trace the activation memory of ``backbone`` under ``techniques`` once, for any batch size.

    With checkpointing, the blocks :func:`~earthmind_compat.optimize.checkpointing.chosen_blocks` picks for
    ``checkpoint_every`` are traced checkpointed, the others as they run without it.
    """
    targets = tuple(lora_target_modules or lora_targets(backbone)) if techniques.lora else ()
    blocks = find_blocks(backbone)
    chosen = set(chosen_blocks(len(blocks), checkpoint_every)) if techniques.checkpointing else set()
    skeleton = trace_skeleton(backbone, image_size, in_chans)
    growth: dict[tuple, BlockGrowth] = {}
    kinds = []
    # blocks above the features do not run
    for index, (block, (shape, layout)) in enumerate(zip(blocks, skeleton.inputs, strict=False)):
        sequences, tokens, hidden = shape
        checkpointed = index in chosen
        key = (_block_kind(block), layout, tuple(shape), checkpointed)
        if key not in growth:
            as_applied = replace(techniques, checkpointing=checkpointed)
            growth[key] = block_growth(block, hidden, as_applied, tokens, targets, lora_r, layout)
        kinds.append((growth[key], sequences))
    return ActivationTrace(skeleton, tuple(kinds))


def estimate_activations(
    backbone: nn.Module,
    techniques: Techniques,
    batch_size: int,
    image_size: int,
    lora_r: int = 8,
    lora_target_modules: tuple[str, ...] | None = None,
    in_chans: int = 3,
    checkpoint_every: int = 1,
) -> int:
    """Estimated peak activation bytes of one training step of ``backbone`` (fp32), see the module docstring.

    With checkpointing, only the blocks :func:`~earthmind_compat.optimize.checkpointing.chosen_blocks` picks for
    ``checkpoint_every`` are traced checkpointed; the others keep their activations.
    """
    trace = trace_activations(
        backbone, techniques, image_size, lora_r, lora_target_modules, in_chans, checkpoint_every=checkpoint_every
    )
    return trace.at(batch_size)


def _check_lora_targets(backbone: nn.Module, targets: object) -> tuple[str, ...] | None:
    """``None``, or the target names as a tuple, each naming at least one linear layer of ``backbone``."""
    if targets is None:
        return None
    if isinstance(targets, str) or not all(isinstance(t, str) and t for t in targets):  # type: ignore[union-attr]
        raise ConfigurationError(
            f"LoRA target modules must be a list of module names, e.g. ['qkv', 'proj'], got {targets!r}."
        )
    names = tuple(targets)  # type: ignore[arg-type]
    present = sorted({path.rsplit(".", 1)[-1] for path, m in backbone.named_modules() if isinstance(m, nn.Linear)})
    unknown = [name for name in names if name not in present]
    if unknown or not names:
        raise ConfigurationError(
            f"LoRA target modules {unknown or list(names)} name no linear layer of this backbone; "
            f"its linear layers are named {present}."
        )
    return names


def _total(states_total: int, activations: int, device: str) -> tuple[int, CudaTerms]:
    allocated = states_total + activations
    terms = cuda_terms(allocated) if device == "cuda" else CudaTerms(0, 0, 0)
    return allocated + terms.total, terms


def _largest_batch(trace: ActivationTrace, states_total: int, device: str, memory: int) -> int:
    """The largest batch whose total fits ``memory`` (0 if one image does not): doubling, then bisection."""

    def fits(batch: int) -> bool:
        return _total(states_total, trace.at(batch), device)[0] <= memory

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
        if high > 2**20:  # a million images per device: the memory is no limit worth reporting
            return low
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


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
    strategy: str = "single",
    devices: int = 1,
    device: str = "cpu",
    lora_target_modules: tuple[str, ...] | list[str] | None = None,
    checkpoint_every: int = 1,
    **backbone_kwargs: object,
) -> MemoryPlan:
    """Plan the training memory of a backbone configuration.

    Args:
        backbone: Registered backbone name.
        preset: Preset name (``full`` for the published size).
        technique: Technique string, e.g. ``"nf4+lora+ckpt"``.
        batch_size: Images per step.
        image_size: Image side in pixels.
        gpu_memory: Device memory, e.g. ``"24GiB"``; with it, ``fits`` and ``largest_batch`` are decided.
        optimizer: ``adamw``, ``adam``, ``sgd`` or ``sgd_momentum``.
        in_chans: Input bands.
        lora_r: LoRA rank.
        strategy: ``single``, ``ddp``, ``fsdp`` or ``deepspeed_stage_3`` (per-device figures, see
            :mod:`earthmind_compat.optimize.sharding`).
        devices: Devices taking part (``batch_size`` is per device, as in Lightning).
        device: ``cpu`` (the traced bytes) or ``cuda`` (plus the CUDA context, cuBLAS workspaces and the caching
            allocator's reserve, :mod:`earthmind_compat.optimize.cuda_memory`).
        lora_target_modules: Module names LoRA adapts (default: the backbone's own), as given to ``optimize``.
        checkpoint_every: With ``ckpt``, every n-th block is checkpointed (1: every block), as
            :func:`~earthmind_compat.optimize.apply` does with the same argument.
        **backbone_kwargs: More constructor arguments of the backbone (e.g. ``language_layers=4``).

    Returns:
        A :class:`MemoryPlan` (activations in float32, as on CPU; bfloat16 autocast roughly halves them).

    Raises:
        UnknownNameError: for an unknown backbone, preset, technique or optimizer.
        ConfigurationError: for non-positive sizes or rank, an unknown device, LoRA targets the backbone does not
            have, a strategy that does not go with the devices or technique, or a ``checkpoint_every`` that is not
            an integer >= 1 or comes without ``ckpt``.
    """
    return _plan(
        backbone,
        preset,
        technique,
        batch_size,
        image_size,
        gpu_memory,
        optimizer,
        in_chans,
        lora_r,
        strategy,
        devices,
        device,
        lora_target_modules,
        checkpoint_every,
        **backbone_kwargs,
    )[0]


def largest_batches(
    backbone: str,
    memories: list[str | int],
    preset: str = "full",
    technique: str | Techniques | None = None,
    image_size: int = 224,
    device: str = "cuda",
    **plan_kwargs: object,
) -> dict[int, int]:
    """The largest batch per device that fits each of ``memories``, from one trace.

    Args:
        backbone: Registered backbone name.
        memories: Device memory sizes, e.g. ``["24GiB", "80GiB"]``.
        preset: Preset name.
        technique: Technique string.
        image_size: Image side in pixels.
        device: ``cuda`` (default: with the CUDA terms) or ``cpu``.
        **plan_kwargs: Any other argument of :func:`plan_memory` but the batch size and memory.

    Returns:
        ``{memory in bytes: largest batch}`` (0: not even one image fits).
    """
    _, trace, states_total = _plan(backbone, preset, technique, 1, image_size, None, device=device, **plan_kwargs)
    sizes = [parse_size(memory) for memory in memories]
    return {size: _largest_batch(trace, states_total, device, size) for size in sizes if size is not None}


def _plan(
    backbone: str,
    preset: str = "full",
    technique: str | Techniques | None = None,
    batch_size: int = 1,
    image_size: int = 224,
    gpu_memory: str | int | None = None,
    optimizer: str = "adamw",
    in_chans: int = 3,
    lora_r: int = 8,
    strategy: str = "single",
    devices: int = 1,
    device: str = "cpu",
    lora_target_modules: tuple[str, ...] | list[str] | None = None,
    checkpoint_every: int = 1,
    **backbone_kwargs: object,
) -> tuple[MemoryPlan, ActivationTrace, int]:
    """:func:`plan_memory`, with the activation trace and the bytes that do not grow with the batch."""
    techniques = parse_technique(technique)
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise unknown_name("optimizer", optimizer, OPTIMIZER_STATE_BYTES)
    for label, value in (("batch size", batch_size), ("image size", image_size), ("LoRA rank", lora_r)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"{label} must be a positive integer, got {value!r}.")
    check_device(device)
    check_granularity(checkpoint_every, techniques)
    device_memory = parse_size(gpu_memory)
    model = build_on_meta(backbone, preset, in_chans, **backbone_kwargs)
    targets = _check_lora_targets(model, lora_target_modules) if techniques.lora else None
    counts = count_weights(model, techniques, lora_r, targets)
    unoptimized = count_weights(model, parse_technique("none"))["weights"]
    states = device_states(
        model,
        techniques,
        strategy,
        devices,
        counts["weights"],
        counts["trainable"],
        OPTIMIZER_STATE_BYTES[optimizer],
    )
    optimizer_bytes = states.optimizer + OPTIMIZER_STEP_BYTES[optimizer] * count_trainable_tensors(
        model, techniques, targets
    )
    trace = trace_activations(
        model, techniques, image_size, lora_r, targets, in_chans, checkpoint_every=checkpoint_every
    )
    activations = trace.at(batch_size)
    states_total = states.weights + states.gradients + optimizer_bytes + states.workspace
    total, terms = _total(states_total, activations, device)
    plan = MemoryPlan(
        backbone,
        preset,
        techniques.name,
        batch_size,
        image_size,
        counts["parameters"],
        states.weights,
        unoptimized,
        states.gradients,
        optimizer_bytes,
        activations,
        total,
        device_memory,
        None if device_memory is None else total <= device_memory,
        strategy,
        devices,
        states.workspace,
        device,
        terms.context,
        terms.cublas_workspace,
        terms.allocator_reserve,
        None if device_memory is None else _largest_batch(trace, states_total, device, device_memory),
    )
    return plan, trace, states_total


def measure_activation_peak(backbone: nn.Module, x: torch.Tensor) -> int:
    """Measured peak bytes allocated on CPU during one forward + backward, above what existed before.

    Gradient buffers are allocated by a warm-up step first (and zeroed, not freed), so the peak is the
    activations plus backward workspace, as the planner's activation figure. Measured with the PyTorch
    profiler's allocator events (``profile_memory=True``): the running sum of allocations and frees.
    """
    backbone.train()
    generator = torch.Generator().manual_seed(0)
    directions: list[torch.Tensor] = []

    def step() -> None:
        features = backbone(x)
        if not directions:  # fixed random directions: every feature gets a real gradient, as from a decoder
            directions.extend(torch.randn(f.shape, generator=generator, dtype=f.dtype) for f in features)
        sum((f * d).sum() for f, d in zip(features, directions, strict=True)).backward()

    step()
    for p in backbone.parameters():
        if p.grad is not None:
            p.grad.zero_()
    return profiled_peak(step)
