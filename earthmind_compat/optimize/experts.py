"""Quantizable MoE experts for Granite 4.0's fused expert stacks.

transformers 5.x stores a mixture-of-experts layer as two 3-D parameters, ``gate_up_proj`` ``[E, 2I, C]``
and ``down_proj`` ``[E, C, I]``, applied with ``F.linear`` on slices. bitsandbytes only replaces
``nn.Linear`` modules, so these stacks (about 6.0 B of Granite 4.0 Tiny's 6.9 B parameters) would stay in
full precision. :class:`QuantizedExperts` holds the same weights as one bitsandbytes linear layer per
expert and projection, and routes tokens exactly as the fused module's eager path does; its backward keeps
only the 4-bit weights (bitsandbytes dequantizes them again when needed), unlike dequantizing a whole
parametrized stack, which autograd would keep alive in full precision for every layer.
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
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            linear.weight = nn.Parameter(weight.clone(), requires_grad=experts.gate_up_proj.requires_grad)
            if quantization is None:
                return linear
            return quantize_linear(linear, quantization, double_quant, compute_dtype)

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


def quantize_experts(
    module: nn.Module,
    quantization: str | None,
    double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> list[str]:
    """Replace every fused expert stack inside ``module`` by a :class:`QuantizedExperts`, in place.

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
    for path in [p for p, child in module.named_modules() if is_fused_experts(child)]:
        child = module.get_submodule(path)
        if child.gate_up_proj.device.type == "meta":
            raise ConfigurationError(f"{path} is on the meta device; load the weights before quantizing experts.")
        module.set_submodule(path, QuantizedExperts(child, quantization, double_quant, compute_dtype))
        del child
        replaced.append(path)
    return replaced
