"""``language_layers=k``: the first k decoder layers of the released language model over the projected image tokens.

Every checkpoint is a tiny model built from ``transformers``' real config classes and written in the layouts the
publishers ship (native ``-hf``, InternVL's remote ``internvl_chat``, EarthMind's ``sa2va_chat``). The reference is
``transformers``' own language model (``Qwen2Model`` / ``Qwen2ForCausalLM``), loaded independently of our key map
and fed the same projected tokens through ``inputs_embeds``: with causal attention our layers must reproduce its
hidden states; bidirectional attention must not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from earthmind_reference import TINY_VISION, write_remote_checkpoint
from internvl_layouts import native_model, write_internvl_chat, write_native, write_native_vision
from safetensors import safe_open
from safetensors.torch import save_file
from terratorch.registry import BACKBONE_REGISTRY
from upstream_bugs import TERRATORCH_NECKS_GET_NO_IMAGE_SIZE

from earthmind_compat import weights
from earthmind_compat.errors import ConfigurationError, WeightsError
from earthmind_compat.optimize import apply
from earthmind_compat.optimize.families import derived_lora_targets, find_blocks, lora_targets

pytestmark = pytest.mark.registry

K = 2  # language layers run in these tests; the checkpoints hold 4
LM_LAYERS = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny InternVL2.5 model (4 language layers) in the native and remote layouts, and a tiny EarthMind."""
    root = tmp_path_factory.mktemp("language")
    model = native_model(seed=11, text_layers=LM_LAYERS)
    return {
        "native": write_native(model, root / "native", shards=2),
        "internvl_chat": write_internvl_chat(model, root / "internvl_chat", shards=2),
        "native_vision": write_native_vision(model, root / "native_vision"),
        "sa2va_chat": _earthmind(root / "sa2va_chat"),
    }


def _earthmind(directory: Path) -> Path:
    write_remote_checkpoint(directory, TINY_VISION, seed=4, llm_layers=LM_LAYERS)
    return directory


def _image(seed: int = 3, channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, 56, 56, generator=torch.Generator().manual_seed(seed))


def reference_language_model(directory: Path):
    """transformers' ``Qwen2ForCausalLM`` with every ``language_model.*`` tensor of a remote checkpoint (strict).

    Written from the remote layout (``language_model.`` + the ``Qwen2ForCausalLM`` names), not from our key map.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = json.loads((directory / "config.json").read_text())["llm_config"]
    model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in config.items() if k != "architectures"}))
    state = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if key.startswith("language_model."):
                    state[key.removeprefix("language_model.")] = handle.get_tensor(key).float()
    model.load_state_dict(state, strict=not config.get("tie_word_embeddings", True))
    return model.eval()


def reference_hidden_states(language_model, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The language model's per-layer hidden states for ``inputs_embeds=tokens`` (its own causal mask)."""
    with torch.no_grad():
        return language_model(inputs_embeds=tokens, output_hidden_states=True).hidden_states


def build(name: str, **kwargs):
    torch.manual_seed(0)
    return BACKBONE_REGISTRY.build(name, preset="tiny", **kwargs).eval()


def run(backbone, x):
    with torch.no_grad():
        return backbone(x)


# -- the features against transformers' own language model -----------------------------------------------------


@pytest.mark.parametrize("layout", ["native", "internvl_chat"])
def test_causal_language_layers_match_transformers(checkpoints, layout):
    directory = checkpoints[layout]
    kwargs = {"weights": str(directory), "language_layers": K, "with_projector": True, "out_indices": [-2, -1]}
    causal = build("internvl2_5_4b", language_attention="causal", **kwargs)
    first, second, projected = run(causal, _image())
    assert first.shape == second.shape == projected.shape == (2, 4, 64)  # 56 px: 4 x 4 patches -> 2 x 2 merged
    if layout == "native":
        from transformers import InternVLForConditionalGeneration

        language_model = InternVLForConditionalGeneration.from_pretrained(str(directory)).model.language_model.eval()
    else:
        language_model = reference_language_model(directory)
    states = reference_hidden_states(language_model, projected)
    torch.testing.assert_close(first, states[1], rtol=0, atol=0)
    torch.testing.assert_close(second, states[2], rtol=0, atol=0)

    bidirectional = build("internvl2_5_4b", **kwargs)
    first_b, second_b, projected_b = run(bidirectional, _image())
    assert torch.equal(projected_b, projected)
    assert not torch.allclose(first_b, first, atol=1e-3)
    assert not torch.allclose(second_b, second, atol=1e-3)


def test_earthmind_language_layers_read_the_release_order(checkpoints):
    """SAR then optical tokens, one sequence, through EarthMind's language model; features laid out per position."""
    directory = checkpoints["sa2va_chat"]
    modalities = {"sar": 3, "optical": 3}
    x = {"sar": _image(1), "optical": _image(2)}
    kwargs = {"weights": str(directory), "modalities": modalities, "language_layers": K, "with_projector": True}
    model = build("earthmind_v1", language_attention="causal", out_indices=[-1], **kwargs)
    last, projected = run(model, x)
    width = TINY_VISION_LLM = projected.shape[-1] // 2
    assert model.out_channels == [2 * TINY_VISION_LLM, 2 * TINY_VISION_LLM]
    sequence = torch.cat(projected.split(width, dim=-1), dim=1)  # SAR tokens, then optical tokens
    states = reference_hidden_states(reference_language_model(directory), sequence)
    torch.testing.assert_close(last, torch.cat(states[K].chunk(2, dim=1), dim=-1), rtol=0, atol=0)

    bidirectional = run(build("earthmind_v1", out_indices=[-1], **kwargs), x)[0]
    assert not torch.allclose(bidirectional, last, atol=1e-4)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_causal_attention_hides_later_tokens_in_every_attention_implementation(implementation, monkeypatch):
    """SDPA runs causal through its own flag (as transformers does), eager through our additive mask: in both, a
    change to the last token leaves every earlier output alone, and both agree."""
    from earthmind_compat.backbones.language import run_language_layers

    model = build("internvl2_5_4b", language_layers=K).language_model
    tokens = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    changed = tokens.clone()
    changed[:, -1] += 1.0
    with torch.no_grad():
        reference = run_language_layers(model, tokens, [K - 1], "causal")[K - 1]
        monkeypatch.setattr(model.config, "_attn_implementation", implementation)
        causal = run_language_layers(model, tokens, [K - 1], "causal")[K - 1]
        moved = run_language_layers(model, changed, [K - 1], "causal")[K - 1]
        bidirectional = run_language_layers(model, changed, [K - 1], "bidirectional")[K - 1]
    torch.testing.assert_close(causal, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(moved[:, :-1], causal[:, :-1], rtol=0, atol=1e-6)
    assert (moved[:, -1] - causal[:, -1]).abs().max() > 1e-2
    assert (bidirectional[:, :-1] - causal[:, :-1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["internvl2_5_4b", "earthmind_v1"])
def test_merge_factors_are_the_grids_the_features_lie_on(name):
    """``backbone.merge_factors`` (read by TokensToGrid without an image size) against the token counts returned:
    at 112 px, 8 x 8 patches: the tower's layers hold 64 tokens (+ CLS), the language layers and the projector 16."""
    kwargs = {"language_layers": 1, "with_projector": True, "out_indices": [0, -1]}
    x = _image()[:1].repeat(1, 1, 2, 2)
    if name == "earthmind_v1":
        kwargs["modalities"] = {"sar": 3, "optical": 3}
        x = {"sar": x, "optical": x}
    backbone = build(name, **kwargs)
    features = run(backbone, x)
    assert backbone.merge_factors == [1, 2, 2]
    for feature, factor in zip(features, backbone.merge_factors, strict=True):
        cls = int(backbone.has_cls_token) if factor == 1 else 0
        assert feature.shape[1] == (8 // factor) ** 2 + cls


# -- weights: only the k layers, strictly --------------------------------------------------------------------------


def test_only_the_first_k_layers_are_read(checkpoints, monkeypatch):
    read: list[str] = []
    original = weights.CheckpointFiles.load

    def recording(self, keys):
        keys = list(keys)
        read.extend(keys)
        return original(self, keys)

    monkeypatch.setattr(weights.CheckpointFiles, "load", recording)
    build("internvl2_5_4b", weights=str(checkpoints["internvl_chat"]), language_layers=K)
    language = sorted({key.split(".")[3] for key in read if key.startswith("language_model.")})
    assert language == [str(i) for i in range(K)]
    assert not [key for key in read if "embed_tokens" in key or "lm_head" in key or key.endswith("model.norm.weight")]


def _copy_with(source: Path, target: Path, drop: str | None = None, add: dict | None = None) -> Path:
    import shutil

    shutil.copytree(source, target)
    for path in target.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys() if k != drop}  # noqa: SIM118
        save_file(tensors, str(path), metadata={"format": "pt"})
    if add:
        extra = target / "model-extra.safetensors"
        save_file(add, str(extra), metadata={"format": "pt"})
        index = target / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        data["weight_map"].update(dict.fromkeys(add, extra.name))
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k != drop}
        index.write_text(json.dumps(data))
    elif drop:
        index = target / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        data["weight_map"].pop(drop, None)
        index.write_text(json.dumps(data))
    return target


def test_missing_or_unknown_language_tensors_are_weights_errors(checkpoints, tmp_path):
    source = checkpoints["internvl_chat"]
    missing = _copy_with(source, tmp_path / "missing", drop="language_model.model.layers.3.mlp.down_proj.weight")
    with pytest.raises(WeightsError, match=r"missing.*language_model\.layers\.3\.mlp\.down_proj\.weight"):
        build("internvl2_5_4b", weights=str(missing), language_layers=K)  # a later layer: still checked
    build("internvl2_5_4b", weights=str(missing), language_layers=0)  # without language layers it is not read

    extra = {"language_model.model.layers.0.self_attn.rotary.weight": torch.zeros(2)}
    unknown = _copy_with(source, tmp_path / "unknown", add=extra)
    with pytest.raises(WeightsError, match=r"unexpected.*language_model\.model\.layers\.0\.self_attn\.rotary"):
        build("internvl2_5_4b", weights=str(unknown), language_layers=K)


def test_layouts_without_language_model_refuse_language_layers(checkpoints):
    with pytest.raises(WeightsError, match=r"holds no .*language model"):
        build("internvl2_5_4b", weights=str(checkpoints["native_vision"]), language_layers=1)


@pytest.mark.reliability
@pytest.mark.parametrize("value", [True, 1.0, "2", -1, 5])
def test_language_layers_must_be_an_integer_in_range(value):
    with pytest.raises(ConfigurationError, match=r"language_layers.*0\.\.(4|N)"):
        build("internvl2_5_4b", language_layers=value)


@pytest.mark.reliability
def test_language_layers_beyond_the_checkpoint_depth_name_it(checkpoints):
    with pytest.raises(ConfigurationError, match=r"language_layers=5 is outside 0\.\.4"):
        build("earthmind_v1", weights=str(checkpoints["sa2va_chat"]), language_layers=5)


@pytest.mark.reliability
@pytest.mark.parametrize("name", ["internvl2_5_4b", "earthmind_v1"])
def test_language_attention_choices(name):
    with pytest.raises(ConfigurationError, match=r"language_attention must be one of 'bidirectional', 'causal'"):
        build(name, language_layers=1, language_attention="masked")


# -- features, out_indices and the blocks the techniques see -------------------------------------------------------


@pytest.mark.shapes
@pytest.mark.parametrize("name", ["internvl2_5_4b", "earthmind_v1"])
def test_out_indices_span_vision_then_language_layers(name):
    model = build(name, language_layers=3, out_indices=[0, 4, -1])  # tiny: 4 vision layers, then 3 language
    features = run(model, _image())
    vision, language = model.vision_config.hidden_size, model.text_hidden_size
    cls = int(model.has_cls_token)
    assert [f.shape for f in features] == [(2, 16 + cls, vision), (2, 4, language), (2, 4, language)]
    assert model.out_channels == [vision, language, language]
    assert len(find_blocks(model)) == 4 + 3
    assert set(lora_targets(model)) == set(derived_lora_targets(model))
    assert {"o_proj", "gate_proj", "up_proj", "down_proj"} <= set(lora_targets(model))


@pytest.mark.numerics
@pytest.mark.parametrize("technique", ["int8", "nf4", "lora", "qlora", "ckpt", "qlora+ckpt"])
def test_techniques_cover_the_language_layers(technique):
    model = BACKBONE_REGISTRY.build("internvl2_5_4b", preset="tiny", language_layers=K, out_indices=[-1])
    apply(model, technique)
    model.train()
    (feature,) = model(_image())
    feature.float().pow(2).mean().backward()
    layer = model.language_model.layers[K - 1]
    if "lora" in technique:
        assert layer.mlp.down_proj.lora_B["earthmind"].weight.grad is not None
    if technique in ("int8", "nf4", "qlora", "qlora+ckpt"):
        base = getattr(layer.self_attn.o_proj, "base_layer", layer.self_attn.o_proj)
        assert type(base).__name__ == ("Linear8bitLt" if technique == "int8" else "Linear4bit")
    if "ckpt" in technique:
        from earthmind_compat.optimize.checkpointing import is_checkpointing

        assert is_checkpointing(model) and len(find_blocks(model)) == 4 + K  # the tower's and the language blocks


# -- numerics: quantized language blocks against full precision, per block ----------------------------------------

#: Relative error and 1 - cosine of a language block's residual branch, quantized vs fp32, measured over 20 seeds
#: (model init and input) x the 4 language blocks of ``internvl2_5_4b`` tiny with ``language_layers=4``
#: (bitsandbytes 0.50.2, torch 2.14.1, CPU), by ``python -m tools.language_tolerance``:
#:   int8 rel 0.0114 +- 0.0013  1-cos 0.00006 +- 0.00001
#:   nf4  rel 0.1307 +- 0.0166  1-cos 0.00855 +- 0.00218
#:   fp4  rel 0.1757 +- 0.0183  1-cos 0.01525 +- 0.00328
LANGUAGE_MEASURED = {
    "int8": {"rel": (0.0114, 0.0013), "1-cos": (0.00006, 0.00001)},
    "nf4": {"rel": (0.1307, 0.0166), "1-cos": (0.00855, 0.00218)},
    "fp4": {"rel": (0.1757, 0.0183), "1-cos": (0.01525, 0.00328)},
}
K_SIGMA = 5.0
VISION_BLOCKS = 4  # the tiny tower's layers come first in find_blocks


def _language_pair(technique: str, seed: int = 0):
    import copy

    torch.manual_seed(seed)
    reference = BACKBONE_REGISTRY.build(
        "internvl2_5_4b", preset="tiny", in_chans=4, language_layers=4, out_indices=[-1]
    ).eval()
    candidate = copy.deepcopy(reference)
    apply(candidate, technique)
    return reference, candidate.eval()


def _language_errors(reference, candidate):
    from earthmind_compat.optimize.numerics import block_errors

    x = torch.randn(2, 4, 56, 56, generator=torch.Generator().manual_seed(100))
    errors = [e for e in block_errors(reference, candidate, x) if e.index >= VISION_BLOCKS]
    assert [e.index for e in errors] == [VISION_BLOCKS + i for i in range(4)], "every language block ran"
    return errors


def _language_violations(errors, quantization: str) -> list[str]:
    bounds = {m: mean + K_SIGMA * std for m, (mean, std) in LANGUAGE_MEASURED[quantization].items()}
    return [
        f"block {e.index}: rel {e.rel_error:.4f} (<= {bounds['rel']:.4f}), 1-cos {1 - e.cosine:.5f}"
        for e in errors
        if e.rel_error > bounds["rel"] or 1 - e.cosine > bounds["1-cos"]
    ]


@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("technique", ["int8", "nf4", "fp4", "nf4+dq"])
def test_quantized_language_blocks_within_measured_tolerance(technique):
    quantization = technique.split("+")[0]
    errors = _language_errors(*_language_pair(technique))
    assert _language_violations(errors, quantization) == []
    # the quantization did act on the language blocks: a no-op would give exactly zero error
    assert min(e.rel_error for e in errors) > 0.2 * LANGUAGE_MEASURED[quantization]["rel"][0]


@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("technique", ["int8", "nf4", "fp4"])
def test_language_tolerance_catches_a_broken_quantizer(technique):
    import bitsandbytes as bnb

    reference, candidate = _language_pair(technique)
    broken = 0
    for layer in candidate.language_model.modules():
        if isinstance(layer, bnb.nn.Linear8bitLt):  # row scales 5 % too large
            layer.weight.SCB.mul_(1.05)
            broken += 1
        elif isinstance(layer, bnb.nn.Linear4bit):  # off-by-one block indexing of the scales
            layer.weight.quant_state.absmax = torch.roll(layer.weight.quant_state.absmax, 1)
            broken += 1
    assert broken == 4 * 7
    errors = _language_errors(reference, candidate)
    flagged = _language_violations(errors, technique)
    assert len(flagged) > len(errors) / 2, flagged


# -- e2e: the real TerraTorch CLI, in process, with language layers under qlora+ckpt -------------------------------


@pytest.mark.e2e
@TERRATORCH_NECKS_GET_NO_IMAGE_SIZE.mark  # test_lifecycle_cli's 96 x 80 tiles
def test_qlora_ckpt_language_layers_fit_test_predict(lifecycle_workdir, monkeypatch):
    """``terratorch fit`` then ``test`` and ``predict`` from its checkpoint (``build_lightning_cli``, in process)."""
    import yaml
    from test_lifecycle_cli import BANDS, assert_predictions_on_the_input_grid, config, only_checkpoint

    from earthmind_compat.optimize.checkpointing import is_checkpointing
    from earthmind_compat.recipes import recommend

    workdir = lifecycle_workdir
    monkeypatch.chdir(workdir)
    run = "internvl_language_qlora_ckpt"
    document = config(run, "internvl2_5_4b", "qlora+ckpt", language_layers=1)
    recipe = recommend("internvl2_5_4b", "UperNetDecoder", preset="tiny", in_chans=len(BANDS), language_layers=1)
    document["model"]["init_args"]["model_args"]["necks"] = recipe.necks
    (workdir / f"{run}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    name = f"{run}.yaml"

    fitted = _terratorch("fit", "-c", name)
    backbone = fitted.model.model.encoder
    assert backbone.language_layers == 1 and backbone.out_channels[-1] == backbone.text_hidden_size
    assert type(backbone.language_model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    assert is_checkpointing(backbone)
    checkpoint = only_checkpoint(workdir, run)
    probe = torch.randn(1, len(BANDS), 96, 80, generator=torch.Generator().manual_seed(0))
    expected = _outputs(fitted.model, probe)
    tested = _terratorch("test", "-c", name, "--ckpt_path", checkpoint)
    assert torch.equal(_outputs(tested.model, probe), expected)  # the adapters and quantized layers reloaded
    out = workdir / f"predictions_{run}"
    _terratorch("predict", "-c", name, "--ckpt_path", checkpoint, "--predict_output_dir", str(out))
    assert_predictions_on_the_input_grid(workdir, out)


@pytest.fixture(scope="module")
def lifecycle_workdir(tmp_path_factory):
    from test_lifecycle_cli import HEIGHT, WIDTH

    from earthmind_compat.synthetic import write_disturbance_dataset

    directory = tmp_path_factory.mktemp("language_cli")
    (directory / "custom_modules").mkdir()
    (directory / "custom_modules" / "__init__.py").write_text("import earthmind_compat\n")
    write_disturbance_dataset(directory / "data", {s: 2 for s in ("train", "val", "test", "predict")}, (HEIGHT, WIDTH))
    return directory


def _terratorch(*args: str):
    from terratorch.cli_tools import build_lightning_cli

    return build_lightning_cli(list(args))


def _outputs(task, x: torch.Tensor) -> torch.Tensor:
    task.eval()
    with torch.no_grad():
        return task.model(x).output


# -- the planner counts the language layers on the meta device ----------------------------------------------------


@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("technique", ["none", "nf4+dq", "qlora"])
@pytest.mark.parametrize("name", ["internvl2_5_4b", "earthmind_v1"])
def test_planner_weight_bytes_are_exact_with_language_layers(name, technique):
    from earthmind_compat.optimize import memory_bytes
    from earthmind_compat.optimize.plan import build_on_meta, count_weights
    from earthmind_compat.optimize.techniques import parse_technique

    on_meta = build_on_meta(name, "tiny", language_layers=3)
    counted = count_weights(on_meta, parse_technique(technique))
    torch.manual_seed(0)
    model = BACKBONE_REGISTRY.build(name, preset="tiny", language_layers=3)
    parameters = sum(p.numel() for p in model.parameters())
    apply(model, technique)
    assert counted["weights"] == memory_bytes(model)
    assert count_weights(on_meta, parse_technique("none"))["parameters"] == parameters
    assert counted["parameters"] > sum(p.numel() for p in build_on_meta(name, "tiny").parameters())


# -- sizes and every decoder ----------------------------------------------------------------------------------------


def test_full_preset_counts_qwen25_3b_non_embedding_parameters_on_meta():
    """Qwen2.5-3B: 2.77 B non-embedding parameters (its model card), 36 layers of 77,076,992."""
    with torch.device("meta"):
        model = BACKBONE_REGISTRY.build("internvl2_5_4b", preset="full", language_layers=36)
    language = sum(p.numel() for p in model.language_model.parameters())
    assert language == 36 * 77_076_992
    assert sum(p.numel() for p in model.parameters()) == 3_091_379_200  # + InternViT-300M + the projector
    assert model.out_channels == [1024, 2048, 2048, 2048]  # default out_indices over 24 + 36 layers
    assert model.out_indices == [14, 29, 44, 59]


@pytest.mark.parametrize("decoder", ["UperNetDecoder", "FCNDecoder", "UNetDecoder", "LinearDecoder", "smp_FPN"])
@pytest.mark.parametrize("name", ["internvl2_5_4b", "earthmind_v1"])
def test_every_decoder_builds_on_language_features(name, decoder):
    from earthmind_compat.recipes import build_model

    model = build_model(
        name, decoder, num_classes=3, preset="tiny", in_chans=4, language_layers=2, out_indices=[-3, -2, -1]
    )
    x = torch.randn(2, 4, 56, 56)
    assert model(x).output.shape == (2, 3, 56, 56)
