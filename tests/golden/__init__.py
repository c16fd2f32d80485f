"""Golden features: committed tiny checkpoints and the features each backbone must produce from them.

PEFT's regression tests and torchgeo's per-weight tests are the model: fixed weights, a fixed input, fixed
outputs. Every matrix cell rebuilds each case below through the user's path (TerraTorch's
``BACKBONE_REGISTRY.build(name, weights=<directory>, **options)``), runs it on the fixed input and compares
with the stored features (``tests/test_golden.py``), so an upstream change that alters the numbers a released
checkpoint produces (an attention kernel, a norm epsilon, position-embedding interpolation, a qkv split, a key
map) fails in the cell where it happens, even though every shape stays right.

Layout (``tests/golden/``):

* ``checkpoints/<checkpoint>/``: a seeded tiny checkpoint per writer of :mod:`.checkpoints`, in the layout the
  backbone's ``weights=`` reads (bf16 safetensors, as the releases are, plus ``config.json``);
* ``features/<case>.safetensors``: the expected features of one case (``feature.<i>``, float32) and the
  tensors of the backbone's newly initialised modules (``new.<name>``, e.g. Granite's patch embedding),
  which a checkpoint does not hold;
* ``manifest.json``: versions, date and seeds of the last regeneration.

Adding a variant is one :class:`GoldenCase` line in :data:`CASES` plus ``python -m tests.golden regenerate
--case <name>``. Nothing here is regenerated automatically: a missing or stale fixture fails the test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
CHECKPOINTS = ROOT / "checkpoints"
FEATURES = ROOT / "features"
MANIFEST = ROOT / "manifest.json"

#: The one command that rewrites the fixtures (never run by the tests).
REGENERATE = "python -m tests.golden regenerate"

#: Tolerance on :func:`scaled_error` (max |ours - stored| / max |stored|, per feature). Measured spread across
#: the environments of the matrix, and the margin taken, are recorded in tests/golden/README.md.
TOLERANCE = 1e-5

BATCH = 2


@dataclass(frozen=True)
class GoldenCase:
    """One golden fixture: which backbone, from which committed checkpoint, with which options, on which input.

    Attributes:
        name: Case id (test id and ``features/<name>.safetensors``).
        backbone: Registered backbone name.
        checkpoint: Directory under ``checkpoints/`` (a writer of :mod:`.checkpoints`).
        options: Keyword arguments of ``BACKBONE_REGISTRY.build`` besides ``weights``.
        inputs: Input shape ``(channels, height, width)``, or ``{modality: (channels, height, width)}`` for a
            dict input (EarthMind's modalities, main one first).
    """

    name: str
    backbone: str
    checkpoint: str
    options: Mapping[str, object] = field(default_factory=dict)
    inputs: tuple[int, int, int] | Mapping[str, tuple[int, int, int]] = (3, 56, 28)


_SO_BANDS = {"sar": ["VV", "VH"], "optical": ["BLUE", "GREEN", "RED", "NIR_NARROW"]}
_SO_IN = {"sar": (2, 56, 28), "optical": (4, 56, 28)}
_SO_FUSED = {"modalities": _SO_BANDS, "with_projector": True}  # with "fusion": EarthMind's two modes
_FOUR_BANDS = ["RED", "GREEN", "BLUE", "SWIR_1"]
_TILE = (3, 64, 32)  # Granite: 4 x 2 patches of 16 px

#: Every golden case. Inputs are not the checkpoints' ``image_size`` (42 px for the InternViT towers) and not
#: square, so position-embedding interpolation is part of what is pinned.
CASES: tuple[GoldenCase, ...] = (
    GoldenCase("internvl2_5_4b", "internvl2_5_4b", "internvl_native", {"with_projector": True}),
    GoldenCase("internvl2_5_4b-bands", "internvl2_5_4b", "internvl_native", {"bands": _FOUR_BANDS}, (4, 28, 42)),
    GoldenCase("internvit_6b", "internvl2_5_4b", "internvit_6b_native", {"with_projector": True}),
    GoldenCase("earthmind_v1-single", "earthmind_v1", "earthmind_release", {"with_projector": True}),
    GoldenCase("earthmind_v1-sar_optical", "earthmind_v1", "earthmind_release", {"modalities": _SO_BANDS}, _SO_IN),
    GoldenCase("earthmind_v1-concat", "earthmind_v1", "earthmind_release", {**_SO_FUSED, "fusion": "concat"}, _SO_IN),
    GoldenCase("earthmind_v1-gate", "earthmind_v1", "earthmind_release", {**_SO_FUSED, "fusion": "gate"}, _SO_IN),
    GoldenCase("granite_4_tiny", "granite_4_tiny", "granite_native", {"in_chans": 3}, _TILE),
    GoldenCase("granite_4_tiny-bidi", "granite_4_tiny", "granite_native", {"bidirectional_mamba": True}, _TILE),
)  # fmt: skip


def case(name: str) -> GoldenCase:
    """The case called ``name``.

    Raises:
        KeyError: naming the known cases.
    """
    for item in CASES:
        if item.name == name:
            return item
    raise KeyError(f"no golden case {name!r}; known: {[c.name for c in CASES]}")


def golden_input(shape: tuple[int, int, int], salt: int = 0, batch: int = BATCH) -> torch.Tensor:
    """A fixed input ``[batch, C, H, W]`` from an integer formula (no random generator, same in every version).

    Values are multiples of 1/16 in [-0.5, 0.5], exact in float32; ``salt`` makes modalities differ.
    """
    channels, height, width = shape
    b, c, h, w = torch.meshgrid(*(torch.arange(n) for n in (batch, channels, height, width)), indexing="ij")
    code = (b * 7 + c * 11 + h * 5 + w * 3 + salt * 13 + (h * w) % 7) % 17
    return (code.to(torch.float32) - 8.0) / 16.0


def case_input(item: GoldenCase) -> torch.Tensor | dict[str, torch.Tensor]:
    """The fixed input of a case: a tensor, or one tensor per modality."""
    if isinstance(item.inputs, Mapping):
        return {name: golden_input(tuple(shape), salt) for salt, (name, shape) in enumerate(item.inputs.items())}
    return golden_input(tuple(item.inputs))


def features_path(item: GoldenCase) -> Path:
    """Where a case's expected features are stored."""
    return FEATURES / f"{item.name}.safetensors"


def build(item: GoldenCase, new_modules: Mapping[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Build a case's backbone through TerraTorch's registry from its committed checkpoint, in eval mode.

    Args:
        item: The case.
        new_modules: ``{"<module>.<param>": tensor}`` for the backbone's newly initialised modules (those a
            checkpoint never holds, ``type(backbone).new_modules``); loaded strictly, module by module.
    """
    from terratorch.registry import BACKBONE_REGISTRY

    import earthmind_compat  # noqa: F401  (registers the backbones)

    backbone = BACKBONE_REGISTRY.build(item.backbone, weights=str(CHECKPOINTS / item.checkpoint), **item.options)
    for module_name in getattr(type(backbone), "new_modules", ()):
        if new_modules is None:
            continue
        prefix = f"{module_name}."
        state = {k[len(prefix) :]: v for k, v in new_modules.items() if k.startswith(prefix)}
        getattr(backbone, module_name).load_state_dict(state, strict=True)
    return backbone.eval()


def run(item: GoldenCase, new_modules: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Build a case's backbone and return its features on the case's fixed input."""
    backbone = build(item, new_modules)
    with torch.no_grad():
        return [f.detach().to(torch.float32) for f in backbone(case_input(item))]


def load_expected(item: GoldenCase) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The stored features of a case and its new-module tensors.

    Raises:
        FileNotFoundError: naming the regeneration command.
    """
    from safetensors.torch import load_file

    path = features_path(item)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; write it with `{REGENERATE} --case {item.name}`.")
    stored = load_file(str(path))
    count = sum(1 for key in stored if key.startswith("feature."))
    features = [stored[f"feature.{i}"] for i in range(count)]
    new = {k[len("new.") :]: v for k, v in stored.items() if k.startswith("new.")}
    return features, new


def scaled_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |ours - expected| / max |expected|``: the largest deviation relative to the feature's scale.

    Scale-relative rather than element-relative, so that values near zero do not dominate; ``inf`` for a
    shape mismatch or a non-finite value.
    """
    if ours.shape != expected.shape or not torch.isfinite(ours).all():
        return math.inf
    scale = expected.abs().max().item()
    return (ours - expected).abs().max().item() / (scale if scale > 0 else 1.0)


def compare(item: GoldenCase) -> list[dict[str, float]]:
    """Rebuild a case and compare every feature with the stored one.

    Returns:
        Per feature: ``scaled`` (:func:`scaled_error`), ``max_abs`` and ``max_rel`` (element-wise, over elements
        with ``|expected| > 1e-3 * max |expected|``), for reporting the spread across environments.
    """
    expected, new = load_expected(item)
    ours = run(item, new)
    if len(ours) != len(expected):
        return [{"scaled": math.inf, "max_abs": math.inf, "max_rel": math.inf}]
    rows = []
    for got, want in zip(ours, expected, strict=True):
        scaled = scaled_error(got, want)
        if math.isinf(scaled):
            rows.append({"scaled": scaled, "max_abs": math.inf, "max_rel": math.inf})
            continue
        diff = (got - want).abs()
        significant = want.abs() > 1e-3 * want.abs().max()
        rel = (diff[significant] / want.abs()[significant]).max().item() if significant.any() else 0.0
        rows.append({"scaled": scaled, "max_abs": diff.max().item(), "max_rel": rel})
    return rows
