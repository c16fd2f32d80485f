"""Checkpoints of every backbone under every technique: strict reload, dtypes, adapter export and merge.

What Lightning and TerraTorch do with a backbone (``state_dict`` -> file -> ``load_state_dict(strict=True)``
into a freshly built one) must give back exactly the model that was saved, for quantized backbones too; a
checkpoint in bf16 or fp16 (as the releases are) must load and train; what a LoRA fine-tune learned must
export without the frozen base and come back onto a fresh backbone.
"""

from __future__ import annotations

import re

import pytest
import torch
from earthmind_reference import write_remote_checkpoint
from safetensors.torch import load_file, save_file
from terratorch.registry import BACKBONE_REGISTRY

from earthmind_compat.backbones.state_match import CheckpointMismatchError
from earthmind_compat.optimize import export_adapters, load_adapters, merge_lora
from earthmind_compat.optimize.plan import build_on_meta, count_weights
from earthmind_compat.optimize.techniques import parse_technique

BACKBONES = ("internvl2_5_4b", "granite_4_tiny", "earthmind_v1")
#: Every quantization, each with and without LoRA (nf4+dq+lora is QLoRA's storage).
RELOAD_TECHNIQUES = ("int8", "nf4", "fp4", "nf4+dq", "int8+lora", "nf4+lora", "fp4+lora", "qlora")


def tiny_input(name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    side = 64 if name == "granite_4_tiny" else 56
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(7)).to(dtype)


def build(name: str, seed: int, **kwargs):
    torch.manual_seed(seed)
    return BACKBONE_REGISTRY.build(name, preset="tiny", **kwargs).eval()


def run(backbone, x):
    with torch.no_grad():
        return backbone(x)


def largest_difference(first, second) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(first, second, strict=True))


def perturb_trainable(backbone, seed: int = 11) -> None:
    """Move every trainable tensor (adapters start as an identity) as a fine-tune would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in backbone.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))


@pytest.mark.numerics
@pytest.mark.parametrize("technique", RELOAD_TECHNIQUES)
@pytest.mark.parametrize("name", BACKBONES)
def test_state_dict_reloads_strictly_into_a_fresh_backbone(name, technique, tmp_path):
    saved = build(name, seed=0, technique=technique)
    perturb_trainable(saved)
    x = tiny_input(name)
    expected = run(saved, x)
    torch.save(saved.state_dict(), tmp_path / "backbone.pt")
    fresh = build(name, seed=1, technique=technique)
    assert largest_difference(run(fresh, x), expected) > 1e-3, "the fresh backbone must start elsewhere"
    fresh.load_state_dict(torch.load(tmp_path / "backbone.pt", weights_only=True), strict=True)
    assert largest_difference(run(fresh, x), expected) == 0.0
    if name == "granite_4_tiny":  # the split MoE experts are quantized and reloaded too
        # transformers 5.x: ...experts.down.0.weight; 4.x: ...output_linear.experts.0.weight
        assert any(re.search(r"\.experts\.(down\.)?0\.weight", key) for key in saved.state_dict())


@pytest.mark.numerics
@pytest.mark.parametrize("name", BACKBONES)
def test_an_8bit_backbone_that_already_ran_still_loads(name):
    """bitsandbytes moves the 8-bit row scales off the weight on the first forward pass, then refuses to load."""
    saved = build(name, seed=0, technique="int8")
    fresh = build(name, seed=1, technique="int8")
    x = tiny_input(name)
    expected = run(saved, x)
    run(fresh, x)
    fresh.load_state_dict(saved.state_dict(), strict=True)
    assert largest_difference(run(fresh, x), expected) == 0.0


# -- checkpoints that do not match the model -------------------------------------------------------------


MISMATCHES = [
    (
        {"technique": "nf4+dq+lora"},
        {"technique": "nf4+lora"},
        r"saved with technique 'nf4\+dq\+lora'.*built with 'nf4\+lora'",
    ),
    ({"technique": "int8"}, {}, r"technique 'int8'.*built with 'none'.*backbone_technique: int8"),
    ({}, {"in_chans": 5}, r"takes 3 input bands and this model's 5.*backbone_bands"),
    ({}, {"preset": "full"}, r"another preset or model width"),
]


@pytest.mark.reliability
@pytest.mark.parametrize(("saved_kwargs", "loaded_kwargs", "message"), MISMATCHES)
def test_a_checkpoint_of_another_configuration_names_both_sides(saved_kwargs, loaded_kwargs, message):
    saved = build("internvl2_5_4b", seed=0, **saved_kwargs)
    kwargs = {"preset": "tiny", **loaded_kwargs}
    if kwargs["preset"] == "full":
        with torch.device("meta"):
            other = BACKBONE_REGISTRY.build("internvl2_5_4b", **kwargs)
    else:
        other = BACKBONE_REGISTRY.build("internvl2_5_4b", **kwargs)
    with pytest.raises(CheckpointMismatchError, match=message):
        other.load_state_dict(saved.state_dict())


@pytest.mark.reliability
def test_a_checkpoint_of_another_backbone_is_named_as_such():
    granite = build("granite_4_tiny", seed=0)
    with pytest.raises(CheckpointMismatchError, match="holds another model"):
        build("internvl2_5_4b", seed=0).load_state_dict(granite.state_dict())


# -- dtypes: checkpoints as the releases store them ------------------------------------------------------


def _cast_files(directory, dtype):
    for path in directory.glob("*.safetensors"):
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def half_checkpoints(request, tmp_path_factory):
    """Tiny checkpoints of every family stored in bf16 or fp16, written from the real config classes."""
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM, InternVLVisionModel

    from earthmind_compat.backbones.granite import GRANITE_PRESETS
    from earthmind_compat.backbones.internvl import INTERNVL_PRESETS, vision_config_from_preset

    dtype, root = request.param, tmp_path_factory.mktemp("half")
    torch.manual_seed(0)
    settings = {k: v for k, v in GRANITE_PRESETS["tiny"].items() if k != "patch_size"}
    GraniteMoeHybridForCausalLM(GraniteMoeHybridConfig(**settings)).to(dtype).save_pretrained(root / "granite")
    InternVLVisionModel(vision_config_from_preset(INTERNVL_PRESETS["tiny"], 3, None)).to(dtype).save_pretrained(
        root / "internvl"
    )
    write_remote_checkpoint(root / "earthmind")
    _cast_files(root / "earthmind", dtype)
    return dtype, {
        "granite_4_tiny": root / "granite",
        "internvl2_5_4b": root / "internvl",
        "earthmind_v1": root / "earthmind",
    }


@pytest.mark.numerics
@pytest.mark.parametrize("compute", [None, "bfloat16", "float16"])
@pytest.mark.parametrize("name", BACKBONES)
def test_half_precision_checkpoints_run_and_train_in_the_chosen_dtype(name, compute, half_checkpoints):
    _, directories = half_checkpoints
    torch.manual_seed(0)  # Granite's patch embedding is new: the same seed gives the same one
    backbone = BACKBONE_REGISTRY.build(name, preset="tiny", weights=str(directories[name]), dtype=compute)
    wanted = {None: torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[compute]
    assert {p.dtype for p in backbone.parameters()} == {wanted}, "every part follows one dtype"
    x = tiny_input(name)
    features = backbone(x)
    assert all(f.dtype == torch.float32 for f in features), "features come back in the input's dtype"
    # the same tensors in float32: the half-precision model is the same model, rounded
    torch.manual_seed(0)
    reference = BACKBONE_REGISTRY.build(name, preset="tiny", weights=str(directories[name]))
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(features[-1].detach().flatten(), reference(x)[-1].flatten(), 0)
    assert cosine > (0.999999 if compute is None else 0.99)
    loss = sum(f.float().pow(2).mean() for f in features)
    loss.backward()
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=1e-3)
    before = [p.detach().clone() for p in backbone.parameters()]
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in backbone.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, backbone.parameters(), strict=True))


@pytest.mark.reliability
@pytest.mark.parametrize("dtype", ["float64", "half precision", 16, True])
def test_an_unknown_dtype_is_refused_with_the_accepted_names(dtype):
    from earthmind_compat.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="bfloat16"):
        BACKBONE_REGISTRY.build("internvl2_5_4b", preset="tiny", dtype=dtype)


# -- adapters: what a fine-tune learned, without the frozen base -------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("technique", ["lora", "qlora"])
@pytest.mark.parametrize("name", BACKBONES)
def test_adapters_export_and_load_onto_a_fresh_backbone(name, technique, tmp_path):
    tuned = build(name, seed=0, technique=technique)
    perturb_trainable(tuned)
    x = tiny_input(name)
    expected = run(tuned, x)
    export = export_adapters(tuned, tmp_path / "adapters.safetensors")
    full = sum(v.numel() * v.element_size() for v in tuned.state_dict().values())
    assert 0 < export.bytes < full  # at full size a small fraction: see the meta-device count below
    assert all("lora_" in key or key.startswith(tuple(tuned.new_modules)) for key in load_file(str(export.path)))
    # the fresh backbone has the same base (same seed here, the same weights= in real use) but new modules
    # (Granite's patch embedding) start elsewhere: the export must carry them
    fresh = build(name, seed=0, technique=technique)
    if tuned.new_modules:
        with torch.no_grad():
            for module in tuned.new_modules:
                for parameter in fresh.get_submodule(module).parameters():
                    parameter.normal_()
    assert largest_difference(run(fresh, x), expected) > 1e-3
    load_adapters(fresh, export.path)
    assert largest_difference(run(fresh, x), expected) == 0.0


@pytest.mark.e2e
def test_adapters_from_another_technique_or_model_are_refused(tmp_path):
    tuned = build("internvl2_5_4b", seed=0, technique="lora")
    path = export_adapters(tuned, tmp_path / "a.safetensors").path
    with pytest.raises(CheckpointMismatchError, match=r"technique 'lora'.*uses 'nf4\+dq\+lora'"):
        load_adapters(build("internvl2_5_4b", seed=0, technique="qlora"), path)
    with pytest.raises(CheckpointMismatchError, match="tensors this model does not have"):
        load_adapters(build("granite_4_tiny", seed=0, technique="lora"), path)


@pytest.mark.numerics
@pytest.mark.parametrize("name", BACKBONES)
def test_merged_lora_computes_what_the_adapters_did(name):
    tuned = build(name, seed=0, technique="lora")
    perturb_trainable(tuned)
    x = tiny_input(name)
    adapted = run(tuned, x)
    base = build(name, seed=0)
    assert largest_difference(run(base, x), adapted) > 1e-3, "the adapters must matter"
    merge_lora(tuned)
    assert not any("lora_" in key for key in tuned.state_dict())
    assert largest_difference(run(tuned, x), adapted) < 1e-5


@pytest.mark.reliability
def test_merging_into_quantized_weights_is_refused():
    from earthmind_compat.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="re-quantize"):
        merge_lora(build("internvl2_5_4b", seed=0, technique="qlora"))


@pytest.mark.e2e
def test_full_granite_adapter_export_is_a_small_fraction_of_the_checkpoint():
    """Counted on the meta device: LoRA r=8 + the patch embedding against the QLoRA weights of the backbone."""
    backbone = build_on_meta("granite_4_tiny", "full")
    counts = count_weights(backbone, parse_technique("qlora"))
    lora = counts["parameters"] - sum(p.numel() for p in backbone.parameters())
    patch = sum(p.numel() for p in backbone.patch_embed.parameters())
    exported = 4 * (lora + patch)
    assert exported / counts["weights"] < 0.01, (exported, counts["weights"])
