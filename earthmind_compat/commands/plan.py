"""``earthmind-compat plan``: will a backbone + technique + batch fit in a given memory?"""

from __future__ import annotations

import argparse
import json

from earthmind_compat.errors import ConfigurationError
from earthmind_compat.sizes import format_bytes, parse_size

NAME = "plan"
HELP = "estimate weights, gradients, optimizer state and activations of a training setup, and whether it fits"


def memory_size(text: str) -> int:
    """``--gpu-memory`` value -> bytes; an unreadable size is an argument error, reported before any heavy import."""
    try:
        size = parse_size(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    assert size is not None
    return size


def lora_target_list(text: str | None) -> list[str] | None:
    """``--lora-targets`` value -> module names (``None`` when not given; the planner checks the names)."""
    if text is None:
        return None
    return [name.strip() for name in text.split(",")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``plan``."""
    parser.add_argument("--backbone", required=True, help="registered backbone name, e.g. internvl2_5_4b")
    parser.add_argument("--preset", default="full", help="preset (default: full)")
    parser.add_argument("--technique", default="none", help="e.g. nf4+lora+ckpt, qlora, int8 (default: none)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per step (default: 1)")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels (default: 224)")
    parser.add_argument(
        "--gpu-memory", type=memory_size, default=None, help="device memory, e.g. 24GiB; decides 'fits'"
    )
    parser.add_argument("--optimizer", default="adamw", help="adamw, adam, sgd or sgd_momentum (default: adamw)")
    parser.add_argument("--in-chans", type=int, default=3, help="input bands (default: 3)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: 8)")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        help="with ckpt: checkpoint every n-th block only (default 1: every block)",
    )
    parser.add_argument(
        "--language-layers", type=int, default=0, help="internvl2_5_4b / earthmind_v1: language layers run (default 0)"
    )
    parser.add_argument(
        "--strategy",
        default="single",
        choices=("single", "ddp", "fsdp", "deepspeed_stage_3"),
        help="training strategy; figures are per device (default: single)",
    )
    parser.add_argument("--devices", type=int, default=1, help="devices taking part (default: 1)")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="cuda adds the CUDA context, cuBLAS workspaces and the caching allocator's reserve (default: cpu)",
    )
    parser.add_argument(
        "--lora-targets",
        default=None,
        help="comma-separated module names LoRA adapts, e.g. qkv,proj (default: the backbone's own)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    """Print the plan; exit code 1 when ``--gpu-memory`` is given and the plan does not fit."""
    from earthmind_compat.optimize.plan import plan_memory

    plan = plan_memory(
        args.backbone,
        preset=args.preset,
        technique=args.technique,
        batch_size=args.batch_size,
        image_size=args.image_size,
        gpu_memory=args.gpu_memory,
        optimizer=args.optimizer,
        in_chans=args.in_chans,
        lora_r=args.lora_r,
        checkpoint_every=args.checkpoint_every,
        strategy=args.strategy,
        devices=args.devices,
        device=args.device,
        lora_target_modules=lora_target_list(args.lora_targets),
        **({"language_layers": args.language_layers} if args.language_layers else {}),
    )
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print(
            f"{plan.backbone} ({plan.preset}, {plan.parameters / 1e6:.1f} M parameters), technique {plan.technique}, "
            f"batch {plan.batch_size} x {plan.image_size} px"
            + (f", {plan.strategy} on {plan.devices} devices (per device)" if plan.strategy != "single" else "")
        )
        for label, value in (
            ("weights", plan.weights),
            ("gradients", plan.gradients),
            ("optimizer state", plan.optimizer),
            ("activations (fp32)", plan.activations),
            *((("strategy workspace", plan.workspace),) if plan.strategy != "single" else ()),
            *(
                (
                    ("CUDA context", plan.cuda_context),
                    ("cuBLAS workspaces", plan.cuda_workspace),
                    ("allocator reserve", plan.allocator_reserve),
                )
                if plan.device == "cuda"
                else ()
            ),
            ("total", plan.total),
        ):
            line = f"  {label:<20} {format_bytes(value):>12}"
            if label == "weights" and plan.weights != plan.unoptimized_weights:
                line += f"  ({plan.weights / plan.unoptimized_weights:.3f} of {format_bytes(plan.unoptimized_weights)})"
            print(line)
        if plan.gpu_memory is not None:
            verdict = "fits" if plan.fits else "does NOT fit"
            print(f"  {verdict} in {format_bytes(plan.gpu_memory)}")
            print(f"  largest batch that fits: {plan.largest_batch} per device")
    return 0 if plan.fits in (None, True) else 1
