"""The memory planner: exact weight bytes, activation estimate against a measured CPU peak, the CLI."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from earthmind_compat.backbones import backbone_class
from earthmind_compat.builders import BACKBONE_BUILDERS
from earthmind_compat.cli import main
from earthmind_compat.errors import ConfigurationError, UnknownNameError
from earthmind_compat.optimize import apply, memory_bytes
from earthmind_compat.optimize.plan import (
    build_on_meta,
    count_weights,
    estimate_activations,
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


#: The seven techniques the planner must get right (issue 17), in table order.
PLANNED_TECHNIQUES = ("none", "int8", "nf4", "lora", "qlora", "ckpt", "qlora+ckpt")
#: Per backbone: its full width and half of it, and two image sizes (patch 14: 256 / 1024 tokens; patch 16: the same).
PROBES = {
    "internvl2_5_4b": ((512, 1024), (224, 448)),
    "earthmind_v1": ((512, 1024), (224, 448)),
    "granite_4_tiny": ((768, 1536), (256, 512)),
}
#: The default suite's cases: every backbone x technique at width 128 and 64 tokens (Granite's Mamba chunk is
#: the sequence, :data:`SMOKE_SETTINGS`). Narrower, fixed allocations dominate: at width 64 and 16 tokens (8 KiB
#: token tensors) the same test measured -21 % .. +28 %, which says nothing about a real configuration.
SMOKE_PROBES = {
    "internvl2_5_4b": ((128,), (112,)),
    "earthmind_v1": ((128,), (112,)),
    "granite_4_tiny": ((128,), (128,)),
}
SMOKE_SETTINGS = {"granite_4_tiny": {"mamba_chunk_size": 64}}
#: ``EARTHMIND_PLANNER_GRID=full`` (what ``nox -s planner_accuracy`` sets) runs the issue's grid, 84 cases of
#: 5 to 90 s each; unset or ``smoke``, the same test runs the 21 small cases above.
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


def _probe_preset(monkeypatch: pytest.MonkeyPatch, name: str, width: int) -> str:
    """A preset of two blocks at ``width`` (heads and MLP scaled with it), registered for the test.

    Two blocks keep a CPU step within seconds and still show every term: a block's own memory, the sum over
    blocks, one block's backward workspace. Granite gets one Mamba and one attention block, and 8 experts of
    which 2 route (64 bitsandbytes experts take minutes per step on CPU; the expert width stays the real one).
    """
    presets = backbone_class(name).spec.presets
    settings = dict(presets["full"], num_hidden_layers=2)
    if name == "granite_4_tiny":
        settings.update(layer_types=["mamba", "attention"], num_local_experts=8, num_experts_per_tok=2)
        settings.update(hidden_size=width, mamba_n_heads=2 * width // 64, num_attention_heads=width // 64)
        settings.update(num_key_value_heads=min(4, width // 64))  # 4 as released, 2 at width 128
    else:
        settings.update(hidden_size=width, num_attention_heads=width // 64, intermediate_size=4 * width)
    if PLANNER_GRID == "smoke":
        settings.update(SMOKE_SETTINGS.get(name, {}))
    key = f"probe_{width}"
    monkeypatch.setitem(presets, key, settings)
    return key


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
    preset = _probe_preset(monkeypatch, name, width)
    error = _error(name, technique, 2, size, preset)
    record_property("planner_error", f"{error:+.4f}")
    assert 0.0 <= error <= 0.10, f"{name} {technique} width {width} {size} px: {error:+.1%}"


@pytest.mark.parametrize("name", ["granite_4_tiny", "internvl2_5_4b"])  # EarthMind runs InternVL's blocks
def test_activation_estimate_checkpointing_every_second_block(monkeypatch, name):
    """``checkpoint_every=2`` of four blocks: blocks 0 and 2 checkpointed, 1 and 3 keep their activations. The
    estimate stays within [0, +10 %] of the measured peak: it traces the two treatments apart and counts a block's
    backward with what the blocks up to it keep (estimating as if every block were checkpointed gives -32 %, the
    bound of uniformly treated blocks, every block's memory plus any workspace, +32 %). Granite's blocks alternate
    Mamba and attention as in the release; with the two Mamba blocks first ([M, M, A, A]) the estimate is +26 %: a
    Mamba block's workspace is counted at the attention block above it (the planner's bound across block kinds)."""
    (width,), (size,) = SMOKE_PROBES[name]
    preset = _probe_preset(monkeypatch, name, width)
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
    assert plan.optimizer == 2 * plan.gradients  # AdamW: two fp32 states per trainable parameter
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


def _fsdp_worker(rank: int, world: int, out_dir: str, name: str, settings: dict, batch: int, size: int) -> None:
    """One rank of a 2-process gloo FSDP2 run on CPU: the local shard's bytes and the forward+backward peak."""
    import json
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from earthmind_compat.optimize.families import find_blocks
    from earthmind_compat.optimize.plan import profiled_peak

    backbone_class(name).spec.presets["probe_fsdp"] = settings  # a spawned process starts from the module's presets
    # a file rendezvous: no port to pick, so no race with other processes for a free one
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank, world_size=world
    )
    try:
        torch.manual_seed(0)
        model = BACKBONE_BUILDERS[name](preset="probe_fsdp", in_chans=3)
        mesh = init_device_mesh("cpu", (world,))
        for block in find_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        local = sum(p.to_local().untyped_storage().nbytes() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters())
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(rank))
        directions: list[torch.Tensor] = []

        def forward_backward() -> None:
            features = model(x)
            if not directions:
                directions.extend(torch.randn(f.shape, generator=torch.Generator().manual_seed(1)) for f in features)
            sum((f * d).sum() for f, d in zip(features, directions, strict=True)).backward()

        forward_backward()  # warm-up step: optimizer state exists, gradients freed as Lightning does
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peak = profiled_peak(forward_backward)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump({"weights": local, "peak": peak}, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.numerics
def test_fsdp_plan_against_two_process_gloo_run(monkeypatch, tmp_path):
    """Per-device weights exact, and the step's peak (activations, gathered layers, gradients) not above the plan.

    The run is FSDP2 (``fully_shard``, each block a unit) on CPU with gloo: FSDP1, which Lightning's FSDPStrategy
    uses, refuses to run without an accelerator.
    """
    import json

    import torch.multiprocessing as mp

    name, batch, size = "internvl2_5_4b", 2, 224
    settings = dict(
        backbone_class(name).spec.presets["full"],
        num_hidden_layers=2,
        hidden_size=256,
        num_attention_heads=4,
        intermediate_size=1024,
    )
    monkeypatch.setitem(backbone_class(name).spec.presets, "probe_fsdp", settings)
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path), name, settings, batch, size), nprocs=2, join=True)
    plan = plan_memory(name, "probe_fsdp", "none", batch, size, strategy="fsdp", devices=2)
    single = plan_memory(name, "probe_fsdp", "none", batch, size)
    # FSDP2 splits dim 0: a parameter of one row (position embeddings, CLS token) stays whole on every device
    assert single.weights / 2 < plan.weights < single.weights
    for rank in range(2):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
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
