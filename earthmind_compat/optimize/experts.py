"""Quantizable MoE experts for Granite 4.0's fused expert stacks.

transformers 5.x stores a mixture-of-experts layer as two 3-D parameters, ``gate_up_proj`` ``[E, 2I, C]``
and ``down_proj`` ``[E, C, I]``, applied with ``F.linear`` on slices; transformers 4.x stores the same
weights as two ``GraniteMoeHybridParallelExperts`` modules (``input_linear`` and ``output_linear``, each one
3-D ``weight`` ``[E, out, in]`` applied to tokens grouped by expert). bitsandbytes only replaces
``nn.Linear`` modules, so these stacks (about 6.0 B of Granite 4.0 Tiny's 6.9 B parameters) would stay in
full precision. :class:`QuantizedExperts` (5.x) and :class:`QuantizedParallelExperts` (4.x) hold the same
weights as one bitsandbytes linear layer per expert and projection, and route tokens exactly as the
transformers module's eager path does; the backward keeps only the 4-bit weights (bitsandbytes dequantizes
them again when needed), unlike dequantizing a whole parametrized stack, which autograd would keep alive in
full precision for every layer.
"""

from __future__ import annotations

import torch
from torch import nn

from earthmind_compat.errors import ConfigurationError
from earthmind_compat.optimize.quantize import quantize_linear


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers 5.x fused expert stack this module knows how to split."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and gate_up.ndim == 3
        and down.ndim == 3
        and hasattr(module, "act_fn")
    )


def is_parallel_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers 4.x ``ParallelExperts`` stack (one 3-D ``weight`` ``[E, out, in]``)."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, nn.Parameter)
        and weight.ndim == 3
        and getattr(module, "num_experts", None) == weight.shape[0]
        and getattr(module, "output_size", None) == weight.shape[1]
        and getattr(module, "input_size", None) == weight.shape[2]
    )


def is_expert_stack(module: nn.Module) -> bool:
    """Whether ``module`` holds MoE expert weights this module can split (either transformers layout)."""
    return is_fused_experts(module) or is_parallel_experts(module)


def expert_weights(module: nn.Module) -> tuple[nn.Parameter, ...]:
    """The 3-D expert weights ``[E, out, in]`` of an expert stack of either layout (empty for other modules)."""
    if is_fused_experts(module):
        return (module.gate_up_proj, module.down_proj)
    if is_parallel_experts(module):
        return (module.weight,)
    return ()


def _split_linear(
    weight: torch.Tensor,
    requires_grad: bool,
    quantization: str | None,
    double_quant: bool,
    compute_dtype: torch.dtype | None,
) -> nn.Module:
    """One expert's ``[out, in]`` weight as an ``nn.Linear`` (quantized unless ``quantization`` is None)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.clone(), requires_grad=requires_grad)
    if quantization is None:
        return linear
    return quantize_linear(linear, quantization, double_quant, compute_dtype)


class QuantizedExperts(nn.Module):
    """Per-expert (optionally bitsandbytes-quantized) linear layers, a drop-in for a fused expert stack.

    Args:
        experts: The fused module (``gate_up_proj`` ``[E, 2I, C]``, ``down_proj`` ``[E, C, I]``, ``act_fn``).
        quantization: ``"nf4"``, ``"fp4"``, ``"int8"``, or ``None`` to keep full precision (same routing).
        double_quant: Double-quantize the 4-bit scales.
        compute_dtype: dtype of the 4-bit matmuls.

    Raises:
        ConfigurationError: for a layout it does not know (transposed, interleaved or biased stacks).
    """

    def __init__(
        self,
        experts: nn.Module,
        quantization: str | None,
        double_quant: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not is_fused_experts(experts):
            raise ConfigurationError(f"{type(experts).__name__} is not a fused expert stack (gate_up_proj/down_proj).")
        for flag, wanted in (("is_transposed", False), ("is_concatenated", True), ("has_bias", False)):
            if getattr(experts, flag, wanted) != wanted:
                raise ConfigurationError(
                    f"{type(experts).__name__} has {flag}={not wanted}; only the Granite 4.0 layout "
                    "(gate and up concatenated, [out, in] per expert, no bias) can be split into linear layers."
                )
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        self.num_experts = gate_up.shape[0]
        self.act_fn = experts.act_fn
        self.quantization = quantization

        def make(weight: torch.Tensor) -> nn.Module:
            return _split_linear(weight, experts.gate_up_proj.requires_grad, quantization, double_quant, compute_dtype)

        self.gate_up = nn.ModuleList(make(gate_up[e]) for e in range(self.num_experts))
        self.down = nn.ModuleList(make(down[e]) for e in range(self.num_experts))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """Route each token to its top-k experts and sum their weighted outputs.

        Args:
            hidden_states: ``[T, C]`` tokens.
            top_k_index: ``[T, k]`` chosen experts per token.
            top_k_weights: ``[T, k]`` routing weights.

        Returns:
            ``[T, C]``.
        """
        output = torch.zeros_like(hidden_states)
        for expert in torch.unique(top_k_index).tolist():
            token_idx, slot = torch.where(top_k_index == expert)
            gate, up = self.gate_up[expert](hidden_states[token_idx]).chunk(2, dim=-1)
            expert_out = self.down[expert](self.act_fn(gate) * up)
            expert_out = expert_out * top_k_weights[token_idx, slot, None]
            output.index_add_(0, token_idx, expert_out.to(output.dtype))
        return output


class QuantizedParallelExperts(nn.Module):
    """Per-expert (optionally quantized) linear layers, a drop-in for a transformers 4.x ``ParallelExperts``.

    The layers are kept in ``experts`` (so their paths read ``...input_linear.experts.<e>``, like the 5.x
    split's ``...experts.gate_up.<e>``, and LoRA target matching never mistakes them for the shared MLP).

    Args:
        parallel: The 4.x module (``weight`` ``[E, out, in]``, ``forward(inputs, expert_size)``).
        quantization: ``"nf4"``, ``"fp4"``, ``"int8"``, or ``None`` to keep full precision.
        double_quant: Double-quantize the 4-bit scales.
        compute_dtype: dtype of the 4-bit matmuls.

    Raises:
        ConfigurationError: if ``parallel`` is not such a module.
    """

    def __init__(
        self,
        parallel: nn.Module,
        quantization: str | None,
        double_quant: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not is_parallel_experts(parallel):
            raise ConfigurationError(f"{type(parallel).__name__} is not a ParallelExperts stack (3-D weight).")
        weight = parallel.weight.detach()
        self.num_experts = parallel.num_experts
        self.input_size = parallel.input_size
        self.output_size = parallel.output_size
        self.quantization = quantization
        self.experts = nn.ModuleList(
            _split_linear(weight[e], parallel.weight.requires_grad, quantization, double_quant, compute_dtype)
            for e in range(self.num_experts)
        )

    def forward(self, inputs: torch.Tensor, expert_size: list[int]) -> torch.Tensor:
        """Apply expert ``e`` to its group of rows, as the 4.x module does.

        Args:
            inputs: ``[T * k, in]`` token copies, grouped by expert in expert order.
            expert_size: Number of rows of each expert's group.

        Returns:
            ``[T * k, out]``.

        An expert without rows is not called: bitsandbytes keeps an empty input on its autograd context (outside
        the saved-tensor hooks), and that empty view would hold the whole grouped input alive until the backward
        (with checkpointing too), so the memory a step keeps would depend on the routing.
        """
        groups = inputs.split(expert_size, dim=0)
        outputs = [
            self.experts[e](group) if group.shape[0] else group.new_empty(0, self.output_size)
            for e, group in enumerate(groups)
        ]
        return torch.cat(outputs, dim=0)


def quantize_experts(
    module: nn.Module,
    quantization: str | None,
    double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> list[str]:
    """Replace every expert stack inside ``module`` by its split, quantized form, in place.

    A transformers 5.x fused stack becomes a :class:`QuantizedExperts`, a 4.x ``ParallelExperts`` a
    :class:`QuantizedParallelExperts`.

    Args:
        module: A backbone or transformers model.
        quantization: ``"nf4"``, ``"fp4"``, ``"int8"`` or ``None`` (split without quantizing).
        double_quant: Double-quantize the 4-bit scales.
        compute_dtype: dtype of the 4-bit matmuls.

    Returns:
        Paths of the replaced expert modules (empty for a model without MoE).
    """
    replaced = []
    # Paths first, modules one at a time: holding every old module until the end would double the memory.
    for path in [p for p, child in module.named_modules() if is_expert_stack(child)]:
        child = module.get_submodule(path)
        if expert_weights(child)[0].device.type == "meta":
            raise ConfigurationError(f"{path} is on the meta device; load the weights before quantizing experts.")
        split = QuantizedExperts if is_fused_experts(child) else QuantizedParallelExperts
        module.set_submodule(path, split(child, quantization, double_quant, compute_dtype))
        del child
        replaced.append(path)
    return replaced
