"""What activation checkpointing costs at full width: train-step time and activation memory, with and without.

Each backbone is built at its ``full`` width with only a few blocks (a preset registered for this process,
``full`` with ``num_hidden_layers`` overridden; Granite keeps its 64 experts, top-6, and gets one attention
layer at index 1 among Mamba-2 layers), at its realistic input size (448 px for InternViT's patch 14: 1024
tokens; 512 px for Granite's patch 16: 1024 tokens; EarthMind with a SAR and an optical image). Each technique
is applied the way users get it, ``BACKBONE_BUILDERS[name](..., technique=...)``. The variants of one pair share
their weights (same tensors), so two models cost one model's memory.

Time: one training step is forward, a mean-square loss over every feature, backward, gradients cleared
(:func:`earthmind_compat.bench.measure.make_step`). The variants are interleaved (A B A B ...) in one process
and the median of ``--rounds`` steps is taken, so a busy machine slows both alike; the ratio is the figure. Both
the wall time and the process's CPU time (user + system, ``time.process_time``) are recorded: on a shared machine
the CPU time is the steadier of the two (another job's load does not enter it); the system part is real work
(the kernel zeroing freshly mapped pages for large activations, which varies from step to step with the
allocator's state). ``min x`` is the ratio of the fastest steps, the least disturbed by either. ``+fwd`` is the
extra CPU time of a variant over the plain step in units of the plain model's forward (no graph, timed interleaved
too): recomputing every block once costs at most about 1.0.
Memory: the planner's measured activation peak (:func:`earthmind_compat.optimize.plan.measure_activation_peak`,
allocator events during one forward + backward, gradient buffers allocated beforehand) and the bytes autograd
saves (:func:`earthmind_compat.bench.measure.saved_activation_bytes`).

Torch runs on one thread (``torch.set_num_threads(1)``; set ``OMP_NUM_THREADS=1`` too) for stable numbers::

    OMP_NUM_THREADS=1 python -m tools.checkpoint_cost --groups none lora --every 2 --json /tmp/checkpoint_cost.json

Granite at 4 blocks took about 12 GB of resident memory (its 64 experts, three variants' gradients); a run
beside the test suite was killed by the kernel's out-of-memory killer. Repository tooling, not shipped in the wheel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

BACKBONES = ("internvl2_5_4b", "earthmind_v1", "granite_4_tiny")
#: Input side per backbone: 1024 tokens for every tower (InternViT patch 14, Granite patch 16).
SIDES = {"internvl2_5_4b": 448, "earthmind_v1": 448, "granite_4_tiny": 512}
#: EarthMind as it is meant to be used: a SAR image and an optical image through the shared tower.
EARTHMIND_MODALITIES = {"S1GRD": ["VV", "VH"], "S2L2A": ["BLUE", "GREEN", "RED"]}
#: Groups compared: the first variant (no checkpointing) is the reference of the others' ratios.
GROUPS = {"none": ("none", "ckpt"), "lora": ("lora", "lora+ckpt")}
PRESET = "ckpt_cost"


def few_block_settings(name: str, layers: int) -> dict:
    """The ``full`` preset of ``name`` with ``layers`` blocks (Granite: attention at block 1, Mamba-2 elsewhere)."""
    from earthmind_compat.backbones import backbone_class

    settings = dict(backbone_class(name).spec.presets["full"], num_hidden_layers=layers)
    if name == "granite_4_tiny":
        settings["layer_types"] = ["attention" if i == 1 else "mamba" for i in range(layers)]
    return settings


@contextmanager
def few_block_preset(name: str, layers: int) -> Iterator[str]:
    """Register :func:`few_block_settings` as preset ``ckpt_cost`` of ``name`` for the duration of the block."""
    from earthmind_compat.backbones import backbone_class

    presets = backbone_class(name).spec.presets
    presets[PRESET] = few_block_settings(name, layers)
    try:
        yield PRESET
    finally:
        del presets[PRESET]


def build(name: str, technique: str, preset: str, every: int):
    """The backbone through its registered builder, as users get it, seeded (so a group starts equal).

    ``every`` > 1 asks for checkpointing of every n-th block (``activation_checkpointing={"every": n}``).
    """
    import torch

    from earthmind_compat.builders import BACKBONE_BUILDERS

    torch.manual_seed(0)
    extra = {"modalities": EARTHMIND_MODALITIES} if name == "earthmind_v1" else {"in_chans": 3}
    if every > 1:
        lora = "lora" in technique.split("+")
        extra.update(lora=lora, activation_checkpointing={"every": every})
    else:
        extra["technique"] = technique
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BACKBONE_BUILDERS[name](preset=preset, **extra).train()


def share_weights(source, target) -> None:
    """Point every parameter and buffer of ``target`` at ``source``'s tensor of the same name (same structure)."""
    for kind in ("named_parameters", "named_buffers"):
        mine = dict(getattr(source, kind)())
        theirs = dict(getattr(target, kind)())
        if mine.keys() != theirs.keys():
            raise ValueError(f"the two variants differ in {kind}: {sorted(mine.keys() ^ theirs.keys())[:5]}")
        for key, tensor in theirs.items():
            tensor.data = mine[key].data


def variants(group: str, everies: Sequence[int]) -> list[tuple[str, int]]:
    """``(technique, every)`` of a group: without checkpointing, every block, then every n-th block for each n."""
    plain, checkpointed = GROUPS[group]
    return [(plain, 1), (checkpointed, 1)] + [(checkpointed, n) for n in everies]


def label(technique: str, every: int) -> str:
    """``"ckpt"``, or ``"ckpt/2"`` for every second block."""
    return technique if every == 1 else f"{technique}/{every}"


def measure_group(name: str, group: list[tuple[str, int]], layers: int, batch: int, rounds: int) -> dict:
    """Step time (interleaved medians) and activation memory of each variant of ``group``; ratios to the first."""
    import torch

    from earthmind_compat.bench.measure import make_step, saved_activation_bytes
    from earthmind_compat.optimize.checkpointing import checkpointed_blocks
    from earthmind_compat.optimize.plan import measure_activation_peak

    with few_block_preset(name, layers) as preset:
        models = [build(name, technique, preset, every) for technique, every in group]
    for model in models[1:]:
        share_weights(models[0], model)
    side = SIDES[name]
    x = torch.randn(batch, models[0].in_chans, side, side, generator=torch.Generator().manual_seed(0))
    steps = [make_step(model, "train", x) for model in models]

    def forward() -> None:  # what a recompute of every block costs at most: the plain model's forward, no graph
        with torch.no_grad():
            models[0](x)

    steps.append(forward)
    times: list[list[float]] = [[] for _ in steps]
    cpu: list[list[float]] = [[] for _ in steps]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in steps:  # warm-up
            step()
        for _ in range(rounds):
            for k, step in enumerate(steps):
                start, start_cpu = time.perf_counter(), time.process_time()
                step()
                cpu[k].append(time.process_time() - start_cpu)
                times[k].append(time.perf_counter() - start)
        peaks = []
        for model in models:
            peaks.append(measure_activation_peak(model, x))
            for p in model.parameters():
                p.grad = None
        saved = [saved_activation_bytes(model, x) for model in models]
    *medians, forward_median = (statistics.median(t) for t in times)
    *cpu_medians, forward_cpu = (statistics.median(t) for t in cpu)
    return {
        "backbone": name,
        "variants": [label(*v) for v in group],
        "checkpointed_blocks": [checkpointed_blocks(model) for model in models],
        "blocks": layers,
        "batch": batch,
        "image_size": side,
        "step_seconds": medians,
        "step_seconds_all": times,
        "step_cpu_seconds": cpu_medians,
        "step_cpu_seconds_all": cpu,
        "activation_peak_bytes": peaks,
        "saved_bytes": saved,
        "forward_seconds": forward_median,
        "forward_cpu_seconds": forward_cpu,
        "extra_cpu_per_forward": [(m - cpu_medians[0]) / forward_cpu for m in cpu_medians],
        "time_ratio": [m / medians[0] for m in medians],
        "cpu_time_ratio": [m / cpu_medians[0] for m in cpu_medians],
        "cpu_time_ratio_min": [min(c) / min(cpu[0]) for c in cpu[: len(models)]],
        "peak_ratio": [p / peaks[0] for p in peaks],
        "saved_ratio": [b / saved[0] for b in saved],
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line (``--help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.checkpoint_cost",
        description="Train-step time and activation-memory ratios of activation checkpointing at full width.",
    )
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument(
        "--groups",
        nargs="+",
        default=["none"],
        choices=sorted(GROUPS),
        help="none: none vs ckpt (default); lora: lora vs lora+ckpt",
    )
    parser.add_argument(
        "--every", nargs="*", type=int, default=[], help="also checkpoint every n-th block only, for each n given"
    )
    parser.add_argument("--blocks", type=int, default=4, help="blocks per backbone (default 4)")
    parser.add_argument("--batch", type=int, default=1, help="images per step (default 1)")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per variant, interleaved (default 7)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.blocks < 2 or args.rounds < 1 or args.batch < 1 or any(n < 2 for n in args.every):
        parser.error("--blocks must be >= 2, --rounds and --batch >= 1, each --every >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Measure every backbone x group; print a table, optionally write JSON."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    torch.set_num_threads(1)
    results = []
    header = (
        "backbone",
        "variant",
        "wall s",
        "wall x",
        "cpu s",
        "cpu x",
        "min x",
        "+fwd",
        "peak MiB",
        "peak x",
        "saved x",
    )
    print("{:16s} {:14s} {:>7s} {:>7s} {:>7s} {:>7s} {:>7s} {:>6s} {:>9s} {:>7s} {:>7s}".format(*header))
    for name in args.backbones:
        for group in args.groups:
            result = measure_group(name, variants(group, args.every), args.blocks, args.batch, args.rounds)
            results.append(result)
            for k, variant in enumerate(result["variants"]):
                print(
                    f"{name:16s} {variant:14s} {result['step_seconds'][k]:7.2f} {result['time_ratio'][k]:6.2f}x "
                    f"{result['step_cpu_seconds'][k]:7.2f} {result['cpu_time_ratio'][k]:6.2f}x "
                    f"{result['cpu_time_ratio_min'][k]:6.2f}x "
                    f"{result['extra_cpu_per_forward'][k]:6.2f} "
                    f"{result['activation_peak_bytes'][k] / 2**20:9.0f} {result['peak_ratio'][k]:6.2f}x "
                    f"{result['saved_ratio'][k]:6.2f}x",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"torch_threads": torch.get_num_threads(), "args": vars(args), "results": results}, handle, indent=1
            )
    return results


if __name__ == "__main__":
    main()
