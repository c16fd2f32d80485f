"""The optimize API: technique parsing, the YAML route, expert quantization, load-time quantization, traps."""

from __future__ import annotations

import copy
import math
import weakref

import pytest
import torch
from terratorch.models import EncoderDecoderFactory
from torch import nn

from earthmind_compat.builders import BACKBONE_BUILDERS
from earthmind_compat.compat import transformers_quantizes_on_cpu
from earthmind_compat.errors import ConfigurationError, UnknownNameError
from earthmind_compat.optimize import (
    QuantizedExperts,
    QuantizedParallelExperts,
    load_quantized,
    parse_technique,
    quantize_experts,
    quantize_linears,
    weight_share,
)
from earthmind_compat.optimize.experts import expert_weights, is_expert_stack
from earthmind_compat.optimize.families import derived_lora_targets
from earthmind_compat.optimize.plan import build_on_meta

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.mark.registry
def test_parse_technique():
    assert parse_technique("qlora+ckpt").name == "nf4+dq+lora+ckpt"
    assert parse_technique(None).name == "none"
    with pytest.raises(UnknownNameError, match="nf4"):
        parse_technique("nf5")
    with pytest.raises(ConfigurationError, match="two quantizations"):
        parse_technique("nf4+int8")
    with pytest.raises(ConfigurationError, match="nf4 or fp4"):
        parse_technique("int8+dq")


@pytest.mark.registry
@pytest.mark.parametrize("name", sorted(BACKBONE_BUILDERS))
def test_pinned_lora_targets_match_the_model(name):
    model = BACKBONE_BUILDERS[name](preset="tiny")
    assert set(model.spec.lora_targets) == set(derived_lora_targets(model))


@pytest.mark.registry
def test_yaml_route_through_terratorch_factory():
    model = EncoderDecoderFactory().build_model(
        "segmentation",
        backbone="internvl2_5_4b",
        backbone_preset="tiny",
        backbone_quantization={"type": "nf4", "double_quant": True},
        backbone_lora={"r": 4},
        backbone_activation_checkpointing=True,
        necks=[{"name": "ReshapeTokensToImage", "remove_cls_token": True}, {"name": "LearnedInterpolateToPyramidal"}],
        decoder="UperNetDecoder",
        decoder_channels=16,
        num_classes=2,
    )
    assert model.encoder.optimized.technique == "nf4+dq+lora+ckpt"
    model(torch.randn(2, 3, 56, 56)).output.mean().backward()
    lora = [p for n, p in model.encoder.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)


@pytest.mark.reliability
def test_bad_options_raise_clear_errors():
    with pytest.raises(ConfigurationError, match="Did you mean 'quantization'"):
        BACKBONE_BUILDERS["internvl2_5_4b"](preset="tiny", quantisation="nf4")
    with pytest.raises(ConfigurationError, match=r"'rank'.*Valid keys: r,"):
        BACKBONE_BUILDERS["internvl2_5_4b"](preset="tiny", lora={"rank": 4})
    with pytest.raises(ConfigurationError, match="not both"):
        BACKBONE_BUILDERS["internvl2_5_4b"](preset="tiny", technique="nf4", lora=True)


@pytest.mark.registry
def test_terratorch_peft_config_works_with_our_quantization():
    model = EncoderDecoderFactory().build_model(
        "segmentation",
        backbone="internvl2_5_4b",
        backbone_preset="tiny",
        backbone_quantization="nf4",
        peft_config={"method": "LORA", "peft_config_kwargs": {"target_modules": ["q_proj", "v_proj"], "r": 4}},
        necks=[{"name": "ReshapeTokensToImage", "remove_cls_token": True}, {"name": "LearnedInterpolateToPyramidal"}],
        decoder="UperNetDecoder",
        decoder_channels=16,
        num_classes=2,
    )
    model(torch.randn(2, 3, 56, 56)).output.mean().backward()
    assert any("lora_A.default" in n for n, _ in model.encoder.named_parameters())


@pytest.mark.numerics
def test_split_experts_equal_fused_experts_exactly():
    torch.manual_seed(0)
    backbone = BACKBONE_BUILDERS["granite_4_tiny"](preset="tiny").eval()
    fused = backbone.model.layers[0].block_sparse_moe
    x = torch.randn(1, 20, 32)
    with torch.no_grad():
        expected = fused(x)
        assert quantize_experts(backbone, None)
        # transformers 5.x: one fused `experts` module; 4.x: `input_linear` and `output_linear` ParallelExperts
        assert not any(is_expert_stack(m) for m in fused.modules())
        assert any(isinstance(m, (QuantizedExperts, QuantizedParallelExperts)) for m in fused.modules())
        torch.testing.assert_close(fused(x), expected, rtol=1e-6, atol=1e-6)


class _ParallelExpertsLayout(nn.Module):
    """The storage of transformers 4.x's ``GraniteMoeHybridParallelExperts`` (not in 5.x): ``weight [E, out, in]``."""

    def __init__(self, num_experts: int, input_size: int, output_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, output_size, input_size) * 0.1)
        self.num_experts, self.input_size, self.output_size = num_experts, input_size, output_size


def _parallel_experts(num_experts: int, input_size: int, output_size: int) -> nn.Module:
    from transformers.models.granitemoehybrid import modeling_granitemoehybrid

    real = getattr(modeling_granitemoehybrid, "GraniteMoeHybridParallelExperts", None)  # transformers 4.x only
    experts = (real or _ParallelExpertsLayout)(num_experts, input_size, output_size)
    if real is not None:
        nn.init.normal_(experts.weight, std=0.1)
    return experts


@pytest.mark.numerics
@pytest.mark.parametrize("quantization", ["nf4", "fp4"])
def test_an_expert_without_rows_does_not_keep_the_grouped_input(quantization):
    """The rows routed to no expert leave nothing behind: what a step keeps must not depend on the routing.

    bitsandbytes' 4-bit matmul keeps an empty input on its autograd context; called for an expert without rows,
    that empty view held the whole grouped input until the backward (640 KiB of the Granite planner probe).
    """
    torch.manual_seed(0)
    experts = QuantizedParallelExperts(_parallel_experts(3, 64, 32), quantization)
    source = torch.randn(6, 64, requires_grad=True)
    grouped = source * 1.0  # the MoE block's copy of the rows, grouped by expert
    alive = weakref.ref(grouped)
    out = experts(grouped, [4, 0, 2])
    del grouped
    assert alive() is None
    assert out.shape == (6, 32)
    out.square().sum().backward()
    assert source.grad is not None and source.grad.abs().sum() > 0


@pytest.mark.numerics
def test_granite_expert_quantization_share():
    backbone = BACKBONE_BUILDERS["granite_4_tiny"](preset="tiny", quantization={"type": "nf4", "experts": False})
    before = weight_share(backbone)
    quantize_experts(backbone, "nf4")
    after = weight_share(backbone)
    assert after["4bit"] > before["4bit"] and after["total"] == before["total"]
    # full preset on the meta device: experts are most of the parameters
    full = build_on_meta("granite_4_tiny", "full")
    experts = sum(w.numel() for m in full.modules() for w in expert_weights(m))
    linear = sum(m.weight.numel() for m in full.modules() if type(m) is torch.nn.Linear)
    total = sum(p.numel() for p in full.parameters())
    assert linear / total < 0.2  # bitsandbytes alone: most weights stay full precision
    assert (linear + experts) / total > 0.95


@pytest.mark.numerics
def test_load_time_quantization_from_a_saved_tiny_checkpoint(tiny_granite_dir):
    import bitsandbytes as bnb
    from transformers import GraniteMoeHybridModel

    directory, _ = tiny_granite_dir
    if not transformers_quantizes_on_cpu():
        with pytest.raises(ConfigurationError, match=r"cannot quantize while loading on the CPU.*transformers>=4\.53"):
            load_quantized(GraniteMoeHybridModel, directory, "nf4")
        return
    model = load_quantized(GraniteMoeHybridModel, directory, "nf4")
    share = weight_share(model)
    assert share["4bit"] > 0
    quantize_experts(model, "nf4")
    assert weight_share(model)["4bit"] > share["4bit"]
    # the same weights quantized in place from the full-precision model: the same bytes, layer by layer
    full = GraniteMoeHybridModel.from_pretrained(str(directory)).float().eval()
    inplace = copy.deepcopy(full)
    quantize_linears(inplace, "nf4")
    quantize_experts(inplace, "nf4")
    compared = 0
    for name, layer in model.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            twin = inplace.get_submodule(name)
            assert torch.equal(layer.weight.data, twin.weight.data), name
            assert torch.equal(layer.weight.quant_state.absmax, twin.weight.quant_state.absmax), name
            compared += 1
    assert compared >= 10
    # and the quantized model computes what the full-precision one does, up to 4-bit error, not exactly
    x = torch.randn(2, 16, full.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, reference = model.eval()(inputs_embeds=x)[0], full(inputs_embeds=x)[0]
    cosine = torch.nn.functional.cosine_similarity(ours.flatten(), reference.flatten(), dim=0)
    assert 0.95 < cosine < 1.0, cosine


@pytest.mark.numerics
def test_cpu_repacking_trap_is_avoided(monkeypatch):
    """bitsandbytes repacks 4-bit weights on AVX512-BF16 CPUs in eval/no-grad and asserts out % 32 == 0."""
    import bitsandbytes.nn.modules as bnb_modules

    from earthmind_compat.optimize.quantize import quantize_linear

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)  # behave as on such a CPU
    layer = quantize_linear(torch.nn.Linear(64, 48), "nf4")  # 48 % 32 != 0
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer.eval()(x)
    layer.train()
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None and math.isfinite(float(x.grad.sum()))
