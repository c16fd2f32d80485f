"""Probe configurations of the planner's accuracy checks: two blocks of a backbone at a chosen width.

Shared by the planner's accuracy test on CPU (tests/test_plan.py) and the GPU calibration benchmark
(tests/test_benchmarks.py), so both measure the same configurations.
"""

from __future__ import annotations

import pytest

from earthmind_compat.backbones import backbone_class

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


def probe_preset(monkeypatch: pytest.MonkeyPatch, name: str, width: int, smoke: bool) -> str:
    """A preset of two blocks at ``width`` (heads and MLP scaled with it), registered for the test.

    Two blocks keep a CPU step within seconds and still show every term: a block's own memory, the sum over
    blocks, one block's backward workspace. Granite gets one Mamba and one attention block, and 8 experts of
    which 2 route (64 bitsandbytes experts take minutes per step on CPU; the expert width stays the real one).
    ``smoke`` adds :data:`SMOKE_SETTINGS` (the small cases of the default suite).
    """
    presets = backbone_class(name).spec.presets
    settings = dict(presets["full"], num_hidden_layers=2)
    if name == "granite_4_tiny":
        settings.update(layer_types=["mamba", "attention"], num_local_experts=8, num_experts_per_tok=2)
        settings.update(hidden_size=width, mamba_n_heads=2 * width // 64, num_attention_heads=width // 64)
        settings.update(num_key_value_heads=min(4, width // 64))  # 4 as released, 2 at width 128
    else:
        settings.update(hidden_size=width, num_attention_heads=width // 64, intermediate_size=4 * width)
    if smoke:
        settings.update(SMOKE_SETTINGS.get(name, {}))
    key = f"probe_{width}"
    monkeypatch.setitem(presets, key, settings)
    return key
