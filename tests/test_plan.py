"""The memory planner: exact weight bytes, activation estimate against a measured CPU peak, the CLI."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from planner_probes import PLANNED_TECHNIQUES, PROBES, SMOKE_PROBES, probe_preset
from two_process_runs import FSDP_BATCH, FSDP_NAME, FSDP_PRESET, FSDP_SIZE, fsdp_settings

from earthmind_compat.backbones import backbone_class
from earthmind_compat.builders import BACKBONE_BUILDERS
from earthmind_compat.cli import main
from earthmind_compat.errors import ConfigurationError, UnknownNameError
from earthmind_compat.optimize import apply, memory_bytes
from earthmind_compat.optimize.plan import (
    build_on_meta,
    count_weights,
    estimate_activations,
    largest_batches,
    measure_activation_peak,
    parse_size,
    plan_memory,
)
from earthmind_compat.optimize.techniques import parse_technique

pytestmark = [
    pytest.mark.numerics,  # the planner's byte counts and estimates against built and measured models
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


@pytest.mark.parametrize("technique", ["none", "int8", "nf4", "fp4", "nf4+dq", "nf4+lora", "lora"])
@pytest.mark.parametrize("name", sorted(BACKBONE_BUILDERS))
def test_weight_bytes_are_exact(name, technique):
    counted = count_weights(build_on_meta(name, "tiny"), parse_technique(technique))
    torch.manual_seed(0)
    model = BACKBONE_BUILDERS[name](preset="tiny", in_chans=3)
    apply(model, technique)
    assert counted["weights"] == memory_bytes(model)
    assert counted["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


#: ``EARTHMIND_PLANNER_GRID=full`` (what ``nox -s planner_accuracy`` sets) runs the issue's grid, 84 cases of
#: 5 to 90 s each; unset or ``smoke``, the same test runs the 21 small cases of ``SMOKE_PROBES``.
PLANNER_GRID = os.environ.get("EARTHMIND_PLANNER_GRID", "smoke")
if PLANNER_GRID not in ("smoke", "full"):
    raise pytest.UsageError(f"EARTHMIND_PLANNER_GRID={PLANNER_GRID!r}: use 'smoke' (the default) or 'full'.")


def _grid_cases() -> list:
    probes = PROBES if PLANNER_GRID == "full" else SMOKE_PROBES
    cases = []
    for name in sorted(probes):
        widths, sizes = probes[name]
        for technique in PLANNED_TECHNIQUES:
            for width in widths:
                for size in sizes:
                    marks = [pytest.mark.slow] if PLANNER_GRID == "full" else []
                    cases.append(
                        pytest.param(
                            name, technique, width, size, id=f"{name}-{technique}-w{width}-{size}px", marks=marks
                        )
                    )
    return cases


def _error(name: str, technique: str, batch: int, size: int, preset: str = "tiny") -> float:
    torch.manual_seed(0)
    model = BACKBONE_BUILDERS[name](preset=preset, in_chans=3, technique=technique)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = measure_activation_peak(model, torch.randn(batch, 3, size, size))
    del model
    estimate = estimate_activations(build_on_meta(name, preset), parse_technique(technique), batch, size)
    return (estimate - measured) / measured


@pytest.mark.parametrize(("name", "technique", "width", "size"), _grid_cases())
def test_activation_estimate_within_10_percent_never_below(monkeypatch, record_property, name, technique, width, size):
    """The planner's activation peak against the measured one (CPU allocator events), batch 2: in [0, +10 %].

    The error goes to the JUnit XML (``--junitxml``) as the property ``planner_error``: the issue's table.
    """
    preset = probe_preset(monkeypatch, name, width, smoke=PLANNER_GRID == "smoke")
    error = _error(name, technique, 2, size, preset)
    record_property("planner_error", f"{error:+.4f}")
    assert 0.0 <= error <= 0.10, f"{name} {technique} width {width} {size} px: {error:+.1%}"


@pytest.mark.parametrize("name", ["granite_4_tiny", "internvl2_5_4b"])  # EarthMind runs InternVL's blocks
def test_activation_estimate_checkpointing_every_second_block(monkeypatch, name):
    """``checkpoint_every=2`` of four blocks: blocks 0 and 2 checkpointed, 1 and 3 keep their activations. The
    estimate stays within [0, +10 %] of the measured peak: it traces the two treatments apart and counts each block's
    backward with what the blocks below it keep (estimating as if every block were checkpointed gives -32 %, the
    old bound of every block's memory plus any workspace +32 %). Granite's blocks alternate Mamba and attention as
    in the release."""
    (width,), (size,) = SMOKE_PROBES[name]
    preset = probe_preset(monkeypatch, name, width, smoke=True)
    settings = backbone_class(name).spec.presets[preset]
    settings.update(num_hidden_layers=4)
    if name == "granite_4_tiny":
        settings.update(layer_types=["mamba", "attention"] * 2)
    torch.manual_seed(0)
    model = BACKBONE_BUILDERS[name](preset=preset, in_chans=3)
    apply(model, "ckpt", checkpoint_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = measure_activation_peak(model, torch.randn(2, 3, size, size))
    del model
    estimate = estimate_activations(build_on_meta(name, preset), parse_technique("ckpt"), 2, size, checkpoint_every=2)
    assert 0.0 <= (estimate - measured) / measured <= 0.10, f"{name}: {estimate} vs measured {measured}"


def test_checkpoint_every_is_checked_before_anything_is_built():
    with pytest.raises(
        ConfigurationError,
        match=r"checkpoint_every=2 .* technique 'lora' does not checkpoint; add 'ckpt' \('lora\+ckpt'\)",
    ):
        plan_memory("granite_4_tiny", "full", "lora", checkpoint_every=2)
    with pytest.raises(ConfigurationError, match=r"'every' must be an integer >= 1 .* got 0 \(int\)"):
        plan_memory("granite_4_tiny", "full", "ckpt", checkpoint_every=0)
    model = BACKBONE_BUILDERS["internvl2_5_4b"](preset="tiny")
    with pytest.raises(ConfigurationError, match=r"technique 'none' does not checkpoint; add 'ckpt' \('ckpt'\)"):
        apply(model, "none", checkpoint_every=3)
    assert not any(p.requires_grad is False for p in model.parameters())  # refused before anything was applied


def test_plan_adds_up_and_decides_fit():
    plan = plan_memory("internvl2_5_4b", "tiny", "nf4+lora+ckpt", batch_size=2, image_size=112, gpu_memory="1GiB")
    assert plan.total == plan.weights + plan.gradients + plan.optimizer + plan.activations
    assert plan.fits is True
    torch.manual_seed(0)
    model = BACKBONE_BUILDERS["internvl2_5_4b"](preset="tiny", in_chans=3)
    apply(model, "nf4+lora+ckpt")
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    assert plan.optimizer == 2 * plan.gradients + 4 * tensors  # AdamW: two fp32 states per parameter, a step per tensor
    small = plan_memory("internvl2_5_4b", "tiny", "none", batch_size=2, image_size=112, gpu_memory=1000)
    assert small.fits is False
    assert small.weights == small.unoptimized_weights == plan.unoptimized_weights > plan.weights


def test_full_size_weights_counted_on_meta():
    model = build_on_meta("granite_4_tiny", "full")
    full, nf4 = count_weights(model, parse_technique("none")), count_weights(model, parse_technique("nf4"))
    assert full["parameters"] > 6.5e9
    assert full["weights"] == 4 * full["parameters"]
    assert nf4["weights"] / full["weights"] < 0.145  # the experts are counted as 4-bit too


def test_full_internvit_quantized_weight_ratios():
    """Issue targets on the full 304 M tower: int8 <= 0.27 and 4-bit <= 0.145 of the fp32 bytes.

    The meta count equals the bytes of the tower built and quantized on CPU (shown once at full size; exact at
    tiny size in test_weight_bytes_are_exact). Plain nf4 keeps one fp32 absmax per 64 weights, so its linear
    layers cost 0.5625 / 4 = 0.1406 of fp32 at best, and the ~2 M parameters bitsandbytes does not quantize
    (position embedding, patch conv, norms, biases) lift the tower to 0.1463; double quantization gets below.
    """
    model = build_on_meta("internvl2_5_4b", "full")
    fp32 = count_weights(model, parse_technique("none"))["weights"]
    ratio = {t: count_weights(model, parse_technique(t))["weights"] / fp32 for t in ("int8", "nf4", "nf4+dq")}
    assert ratio["int8"] <= 0.27
    assert ratio["nf4+dq"] <= 0.145
    assert 0.1406 < ratio["nf4"] < 0.147


def test_parse_size():
    assert parse_size("24GiB") == 24 * 1024**3
    assert parse_size("80GB") == 80 * 10**9
    with pytest.raises(ConfigurationError, match="24GiB"):
        parse_size("lots")


def test_cli_plan(capsys):
    code = main(
        [
            "plan",
            "--backbone",
            "internvl2_5_4b",
            "--preset",
            "tiny",
            "--technique",
            "qlora+ckpt",
            "--batch-size",
            "2",
            "--image-size",
            "112",
            "--gpu-memory",
            "1KiB",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    for label in ("weights", "gradients", "optimizer state", "activations", "does NOT fit"):
        assert label in out
    # the ratio printed is the real one: bytes of a built QLoRA backbone over a built full-precision one
    from terratorch.registry import BACKBONE_REGISTRY

    from earthmind_compat.optimize import memory_bytes

    quantized = memory_bytes(BACKBONE_REGISTRY.build("internvl2_5_4b", preset="tiny", technique="qlora+ckpt"))
    full = memory_bytes(BACKBONE_REGISTRY.build("internvl2_5_4b", preset="tiny"))
    assert f"({quantized / full:.3f} of " in out
    assert main(["plan", "--backbone", "internvl2_5_4b", "--preset", "tiny", "--technique", "nf4+lora"]) == 0


def test_cli_plan_checkpoint_every(capsys):
    plan = ["plan", "--backbone", "internvl2_5_4b", "--preset", "tiny", "--image-size", "112", "--json"]
    activations = {}
    for every in ("1", "2"):
        assert main([*plan, "--technique", "ckpt", "--checkpoint-every", every]) == 0
        activations[every] = json.loads(capsys.readouterr().out)["activations"]
    assert activations["2"] > activations["1"]  # blocks 1 and 3 keep their activations
    assert main([*plan, "--technique", "lora", "--checkpoint-every", "2"]) == 2
    assert "add 'ckpt' ('lora+ckpt')" in capsys.readouterr().err


def test_cli_plan_prints_no_profiler_log(capfd):
    """The profiler's native layer logs to file descriptor 2 (start/stop, a failed GPU probe); a plan shows none."""
    assert main(["plan", "--backbone", "internvl2_5_4b", "--preset", "tiny", "--image-size", "56"]) == 0
    out, err = capfd.readouterr()
    assert "activations" in out
    assert not [line for line in err.splitlines() if "profiler_st" in line or "gpuGetDeviceCount" in line], err


def test_cli_plan_unknown_names(capsys):
    assert main(["plan", "--backbone", "internvl2_5_4", "--preset", "tiny"]) == 2
    assert "internvl2_5_4b" in capsys.readouterr().err
    with pytest.raises(UnknownNameError, match="nf4"):
        plan_memory("internvl2_5_4b", "tiny", "nf5")


@pytest.mark.numerics
def test_fsdp_plan_against_two_process_gloo_run(monkeypatch, gloo_run):
    """Per-device weights exact, and the step's peak (activations, gathered layers, gradients) not above the plan.

    The run is FSDP2 (``fully_shard``, each block a unit) on CPU with gloo: FSDP1, which Lightning's FSDPStrategy
    uses, refuses to run without an accelerator.
    """
    name, batch, size = FSDP_NAME, FSDP_BATCH, FSDP_SIZE
    monkeypatch.setitem(backbone_class(name).spec.presets, FSDP_PRESET, fsdp_settings())
    plan = plan_memory(name, FSDP_PRESET, "none", batch, size, strategy="fsdp", devices=2)
    single = plan_memory(name, FSDP_PRESET, "none", batch, size)
    # FSDP2 splits dim 0: a parameter of one row (position embeddings, CLS token) stays whole on every device
    assert single.weights / 2 < plan.weights < single.weights
    for rank in range(2):
        measured = json.loads((gloo_run / f"fsdp_rank{rank}.json").read_text())
        assert measured["weights"] == plan.weights
        planned = plan.gradients + plan.activations + plan.workspace
        assert measured["peak"] <= planned <= 1.25 * measured["peak"], (planned, measured["peak"])


def test_cli_plan_per_device(capsys):
    args = ["plan", "--backbone", "internvl2_5_4b", "--preset", "tiny", "--image-size", "56", "--json"]
    assert main([*args, "--strategy", "fsdp", "--devices", "2"]) == 0
    sharded = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    single = json.loads(capsys.readouterr().out)
    assert (sharded["strategy"], sharded["devices"], single["strategy"]) == ("fsdp", 2, "single")
    assert sharded["weights"] < single["weights"] and sharded["workspace"] > 0 == single["workspace"]
    assert sharded["activations"] == single["activations"]  # the batch is per device
    assert main([*args, "--devices", "2"]) == 2  # one process cannot use two devices
    assert "--devices 2" in capsys.readouterr().err


def test_largest_batch_is_the_last_batch_whose_plan_fits():
    """Checked against plans made at that batch and the next one, on CPU and with the CUDA terms."""
    for device in ("cpu", "cuda"):
        at_five = plan_memory("internvl2_5_4b", "tiny", "qlora", batch_size=5, image_size=56, device=device)
        memory = at_five.total + 1
        plan = plan_memory("internvl2_5_4b", "tiny", "qlora", image_size=56, device=device, gpu_memory=memory)
        assert plan.largest_batch == 5, device
        at_six = plan_memory("internvl2_5_4b", "tiny", "qlora", batch_size=6, image_size=56, device=device)
        assert at_six.total > memory
    too_small = plan_memory("internvl2_5_4b", "tiny", "none", image_size=56, gpu_memory=1000)
    assert too_small.largest_batch == 0 and too_small.fits is False


def test_cuda_plan_adds_the_device_terms_to_the_same_trace():
    cpu = plan_memory("granite_4_tiny", "tiny", "nf4+lora", batch_size=2, image_size=64)
    cuda = plan_memory("granite_4_tiny", "tiny", "nf4+lora", batch_size=2, image_size=64, device="cuda")
    assert cuda.activations == cpu.activations and cuda.weights == cpu.weights
    assert cuda.total == cpu.total + cuda.cuda_context + cuda.cuda_workspace + cuda.allocator_reserve
    assert cpu.cuda_context == cpu.cuda_workspace == cpu.allocator_reserve == 0
    assert cuda.cuda_context > 0 and cuda.cuda_workspace > 0 and cuda.allocator_reserve > 0


@pytest.mark.parametrize(("rank", "targets"), [(16, ["q_proj"]), (4, ["fc1", "fc2"]), (8, None)])
def test_lora_rank_and_targets_come_from_the_arguments(rank, targets):
    """Weights and trainable parameters counted for the given rank and targets equal a model built with them."""
    plan = plan_memory("internvl2_5_4b", "tiny", "lora", image_size=56, lora_r=rank, lora_target_modules=targets)
    torch.manual_seed(0)
    model = BACKBONE_BUILDERS["internvl2_5_4b"](preset="tiny", in_chans=3)
    apply(model, "lora", lora_r=rank, lora_target_modules=targets)
    assert plan.weights == memory_bytes(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # AdamW: two fp32 states per trainable parameter and a float32 step counter per trainable tensor
    assert plan.optimizer == 8 * sum(p.numel() for p in trainable) + 4 * len(trainable)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lora_target_modules": ["qkv"]}, "name no linear layer"),
        ({"lora_target_modules": "q_proj"}, "list of module names"),
        ({"device": "gpu"}, "device must be one of"),
        ({"lora_r": 0}, "LoRA rank must be a positive integer"),
        ({"batch_size": True}, "batch size must be a positive integer"),
    ],
)
def test_plan_refuses_bad_arguments_before_tracing(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        plan_memory("internvl2_5_4b", "tiny", "lora", image_size=56, **kwargs)


def test_cli_plan_on_cuda_with_lora_targets(capsys):
    args = ["plan", "--backbone", "internvl2_5_4b", "--preset", "tiny", "--image-size", "56", "--technique", "lora"]
    assert main([*args, "--device", "cuda", "--gpu-memory", "2GiB", "--lora-targets", "q_proj,v_proj"]) == 0
    out = capsys.readouterr().out
    for label in ("CUDA context", "cuBLAS workspaces", "allocator reserve", "largest batch that fits"):
        assert label in out
    assert main([*args, "--lora-targets", "q_proj,wrong"]) == 2
    assert "['wrong'] name no linear layer" in capsys.readouterr().err


def test_largest_batches_from_one_trace_equal_single_plans():
    memories = ["600MiB", "640MiB", "1GiB"]
    table = largest_batches("granite_4_tiny", memories, preset="tiny", technique="qlora", image_size=64)
    for memory in memories:
        plan = plan_memory("granite_4_tiny", "tiny", "qlora", image_size=64, device="cuda", gpu_memory=memory)
        assert table[parse_size(memory)] == plan.largest_batch
    assert len(set(table.values())) == 3  # three different answers: the sizes span the interesting range
