"""Will it fit: the largest batch per GPU for each backbone x technique x image size, from the memory planner.

One trace per backbone, technique and image size (:func:`earthmind_compat.optimize.plan.largest_batches`, full
preset, AdamW, ``device="cuda"``: the CUDA context, cuBLAS workspaces and the allocator's reserve included;
activations in float32 as the planner traces them). Prints a Markdown table (the README's "Will it fit")::

    python -m tools.will_it_fit                                  # the README table (~15 min on 2 CPU cores)
    python -m tools.will_it_fit --backbones granite_4_tiny --techniques qlora --sizes 512 --memories 24GiB

InternViT's patch is 14 px, so its "512 px" column is 518 px: what TerraTorch's EncoderDecoderFactory pads a
512 px tile to. Repository tooling, not shipped in the wheel.
"""

from __future__ import annotations

import argparse
import json
import sys

BACKBONES = ("internvl2_5_4b", "earthmind_v1", "granite_4_tiny")
TECHNIQUES = ("none", "int8", "nf4", "lora", "qlora", "ckpt", "qlora+ckpt")
SIZES = (448, 512)
MEMORIES = ("24GiB", "48GiB", "80GiB")


def model_side(backbone: str, size: int) -> int:
    """The side the backbone sees for a ``size`` px tile: padded up to a multiple of its patch."""
    from earthmind_compat.backbones import backbone_class

    patch = backbone_class(backbone).spec.presets["full"].get("patch_size", 16)
    return -(-size // patch) * patch


def table(backbones: list[str], techniques: list[str], sizes: list[int], memories: list[str]) -> list[dict]:
    """One row per backbone x technique x size: the largest batch per memory size."""
    from earthmind_compat.optimize.plan import largest_batches

    rows = []
    for backbone in backbones:
        for technique in techniques:
            for size in sizes:
                side = model_side(backbone, size)
                batches = largest_batches(backbone, memories, technique=technique, image_size=side)
                rows.append(
                    {"backbone": backbone, "technique": technique, "size": size, "side": side, "batches": batches}
                )
                print(json.dumps({**rows[-1], "batches": list(batches.values())}), file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict], memories: list[str]) -> str:
    """The rows as a Markdown table: backbone, technique, then per memory ``448 px / 512 px`` batches."""
    sizes = sorted({row["size"] for row in rows})
    header = "| backbone | technique | " + " | ".join(f"{m} ({' / '.join(f'{s} px' for s in sizes)})" for m in memories)
    lines = [header + " |", "|---|---|" + "---|" * len(memories)]
    grouped: dict[tuple[str, str], dict[int, list[int]]] = {}
    for row in rows:
        grouped.setdefault((row["backbone"], row["technique"]), {})[row["size"]] = list(row["batches"].values())
    for (backbone, technique), by_size in grouped.items():
        cells = [" / ".join(str(by_size[s][i]) for s in sizes) for i in range(len(memories))]
        lines.append(f"| {backbone} | {technique} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the will-it-fit table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--techniques", nargs="+", default=list(TECHNIQUES))
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--memories", nargs="+", default=list(MEMORIES))
    args = parser.parse_args(argv)
    print(markdown(table(args.backbones, args.techniques, args.sizes, args.memories), args.memories))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
