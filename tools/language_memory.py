"""Peak host memory of loading ``language_layers=k`` from a sharded checkpoint, against loading every layer.

Writes (once) a mid-size native InternVL checkpoint (tiny vision tower, Qwen2 language model 1024 wide with 24
layers, ~1 GB in fp32, 4 safetensors shards with an index), then builds ``internvl2_5_4b`` from it in a fresh
process per k and reports the peak resident set size (sampled every millisecond) above the resident size just before the
build::

    python -m tools.language_memory /tmp/lm_ckpt 4 24

Repository tooling, not shipped in the wheel.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

LANGUAGE = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "intermediate_size": 2816,
    "vocab_size": 64,
}


def write_checkpoint(directory: Path) -> None:
    """The checkpoint: native ``InternVLForConditionalGeneration`` from the real config classes, random weights."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config

    from earthmind_compat.backbones.internvl import INTERNVL_PRESETS, vision_config_from_preset

    torch.manual_seed(0)
    config = InternVLConfig(
        vision_config=vision_config_from_preset(INTERNVL_PRESETS["tiny"], 3, None).to_dict(),
        text_config=Qwen2Config(**LANGUAGE).to_dict(),
        image_token_id=5,
    )
    model = InternVLForConditionalGeneration(config)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(directory, max_shard_size=f"{total // 4 // 1_000_000 + 1}MB")


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure(directory: Path, layers: int) -> dict:
    """Build the backbone with ``language_layers=layers`` from ``directory``; bytes of peak RSS above the start."""
    import torch

    from earthmind_compat.builders import BACKBONE_BUILDERS

    torch.set_num_threads(1)
    import threading

    before, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:  # the resident size every millisecond while the backbone is built
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            done.wait(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        backbone = BACKBONE_BUILDERS["internvl2_5_4b"](preset="tiny", weights=str(directory), language_layers=layers)
    finally:
        done.set()
        sampler.join()
    peak = max(peak[0], _rss())
    held = sum(p.numel() * p.element_size() for p in backbone.language_model.parameters())
    return {"language_layers": layers, "peak_above_start": peak - before, "language_weights": held}


def main(argv: list[str]) -> None:
    """``DIRECTORY K [K ...]``: write the checkpoint if absent, then one fresh process per K."""
    directory = Path(argv[0])
    if len(argv) > 1 and argv[1] == "--one":
        print(json.dumps(measure(directory, int(argv[2]))))
        return
    ks = [int(k) for k in argv[1:]]
    if not (directory / "config.json").exists():
        write_checkpoint(directory)
    size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    print(f"checkpoint {directory}: {size / 2**20:.0f} MiB in {len(list(directory.glob('*.safetensors')))} shards")
    for k in ks:
        out = (
            subprocess.run(
                [sys.executable, "-m", "tools.language_memory", str(directory), "--one", str(k)],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        result = json.loads(out)
        print(
            f"language_layers={k:2d}: peak RSS above start {result['peak_above_start'] / 2**20:7.0f} MiB "
            f"(language weights held {result['language_weights'] / 2**20:6.0f} MiB)"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
