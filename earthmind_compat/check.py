"""``earthmind-compat check``: certify this environment, one row per backbone x feature, at tiny size.

Each feature is a function that takes a backbone name, builds what it needs at the tiny preset on CPU,
runs it, and raises if anything is wrong; it returns a short detail string for the table.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from terratorch.models import EncoderDecoderFactory
from terratorch.models.necks import build_neck_list
from terratorch.registry import BACKBONE_REGISTRY

from earthmind_compat.backbones import BACKBONE_CLASSES, backbone_class
from earthmind_compat.bench.report import align_columns
from earthmind_compat.compat import installed_versions
from earthmind_compat.errors import unknown_name
from earthmind_compat.recipes import DECODER_RULES, build_model

#: Input bands of the tiny models every check builds.
TINY_BANDS = 4

FeatureCheck = Callable[[str], str]
FEATURES: dict[str, FeatureCheck] = {}


def feature(name: str) -> Callable[[FeatureCheck], FeatureCheck]:
    """Register a check under ``name`` (decorator)."""

    def decorate(func: FeatureCheck) -> FeatureCheck:
        FEATURES[name] = func
        return func

    return decorate


def tiny_input(backbone: str, batch: int = 2, bands: int = TINY_BANDS) -> torch.Tensor:
    """A reproducible random image batch of the size ``backbone`` is checked at (``spec.input_size("tiny")``)."""
    size = backbone_class(backbone).spec.input_size("tiny")
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, bands, size, size, generator=generator)


def tiny_backbone(backbone: str, **kwargs: object) -> torch.nn.Module:
    """``backbone`` at the tiny preset for :data:`TINY_BANDS` bands, built by name through TerraTorch's registry."""
    return BACKBONE_REGISTRY.build(backbone, preset="tiny", in_chans=TINY_BANDS, **kwargs)


def expect(condition: bool, message: str) -> None:
    """Raise ``AssertionError(message)`` when ``condition`` is false (kept under ``python -O``)."""
    if not condition:
        raise AssertionError(message)


@feature("forward")
def check_forward(backbone: str) -> str:
    """Build by name through TerraTorch's registry and check the returned tokens against ``out_channels``."""
    model = tiny_backbone(backbone).eval()
    x = tiny_input(backbone)
    with torch.no_grad():
        features = model(x)
    expect(len(features) == len(model.out_channels), f"{len(features)} features for {model.out_channels}")
    rows, cols = model.grid_size(x.shape[-2], x.shape[-1])
    tokens = rows * cols + int(model.has_cls_token)
    for feat, channels in zip(features, model.out_channels, strict=True):
        expect(tuple(feat.shape) == (2, tokens, channels), f"feature {tuple(feat.shape)} != (2, {tokens}, {channels})")
        expect(bool(torch.isfinite(feat).all()), "non-finite feature values")
    return f"{len(features)} x [2, {tokens}, {model.out_channels[0]}]"


@feature("segmentation")
def check_segmentation(backbone: str) -> str:
    """EncoderDecoderFactory with TerraTorch's token-to-pyramid necks and UperNet; check output and a backward."""
    has_cls = backbone_class(backbone).spec.cls_token
    model = EncoderDecoderFactory().build_model(
        "segmentation",
        backbone=backbone,
        backbone_preset="tiny",
        backbone_in_chans=TINY_BANDS,
        necks=[
            {"name": "ReshapeTokensToImage", "remove_cls_token": has_cls},
            {"name": "LearnedInterpolateToPyramidal"},
        ],
        decoder="UperNetDecoder",
        decoder_channels=16,
        num_classes=2,
    )
    x = tiny_input(backbone)
    output = model(x).output
    expect(tuple(output.shape) == (2, 2, x.shape[-2], x.shape[-1]), f"output {tuple(output.shape)}")
    output.mean().backward()
    return f"UperNet -> {list(output.shape)}"


@feature("necks")
def check_necks(backbone: str) -> str:
    """Our necks built by name through TerraTorch's neck list on real tokens; channels as predicted."""
    model = tiny_backbone(backbone).eval()
    x = tiny_input(backbone)
    specs = [
        {
            "name": "TokensToGrid",
            "patch_size": model.patch_size,
            "cls_token": model.has_cls_token,
            "merge_factors": model.merge_factors,
        },
        {"name": "ProjectChannels", "out_channels": 8},
    ]
    necks, _ = build_neck_list(specs, list(model.out_channels))
    predicted = list(model.out_channels)
    with torch.no_grad():
        features = model(x)
        for neck in necks:
            # the prediction, not neck.channel_list: TerraTorch 1.0 leaves the *input* channels there
            predicted = neck.process_channel_list(predicted)
            features = neck(features, image_size=x.shape[-2:])
            real = [f.shape[1] for f in features]
            expect(real == predicted, f"{type(neck).__name__}: {real} != predicted {predicted}")
    rows, cols = model.grid_size(x.shape[-2], x.shape[-1])
    expect(all(tuple(f.shape[-2:]) == (rows, cols) for f in features), "maps are not on the patch grid")
    return f"TokensToGrid + ProjectChannels -> {len(features)} x [2, 8, {rows}, {cols}]"


@feature("decoders")
def check_decoders(backbone: str) -> str:
    """Every decoder with a recommended chain, and classification, built from two names and probed."""
    built = []
    for task, decoder in [*(("segmentation", d) for d in DECODER_RULES), ("classification", "IdentityDecoder")]:
        build_model(backbone, decoder, task, num_classes=2, preset="tiny", in_chans=TINY_BANDS)
        built.append(decoder if task == "segmentation" else "ScalarHead")
    return ", ".join(built)


@dataclass
class Row:
    """One cell of the check table."""

    backbone: str
    feature: str
    status: str
    detail: str
    seconds: float


def validate_names(backbones: Sequence[str], features: Sequence[str]) -> None:
    """Raise :class:`UnknownNameError` (with the closest names) for an unknown backbone or feature."""
    for name in backbones:
        backbone_class(name)
    for name in features:
        if name not in FEATURES:
            raise unknown_name("feature", name, FEATURES)


def run_checks(
    backbones: Sequence[str] | None = None,
    features: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Run every requested feature check on every requested backbone.

    Args:
        backbones: Names to check (default: all registered ones).
        features: Feature names to check (default: all).
        progress: Called with ``"backbone/feature"`` before each check.

    Returns:
        One :class:`Row` per pair, in order.

    Raises:
        UnknownNameError: for an unknown backbone or feature name.
    """
    backbones = list(backbones or BACKBONE_CLASSES)
    features = list(features or FEATURES)
    validate_names(backbones, features)
    rows = []
    for backbone in backbones:
        for name in features:
            if progress is not None:
                progress(f"{backbone}/{name}")
            torch.manual_seed(0)
            start = time.perf_counter()
            try:
                detail = FEATURES[name](backbone)
                status = "pass"
            except Exception as exc:  # a failing check is a row, not a crash
                status = "fail"
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                detail = f"{type(exc).__name__}: {exc} ({Path(frame.filename).name}:{frame.lineno})"
            rows.append(Row(backbone, name, status, detail, round(time.perf_counter() - start, 3)))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """Render rows as a plain-text table."""
    header = ("backbone", "feature", "status", "seconds", "detail")
    return align_columns(
        header, [(r.backbone, r.feature, r.status.upper(), f"{r.seconds:.2f}", r.detail) for r in rows]
    )


def report(rows: Sequence[Row]) -> dict:
    """The JSON document written by ``--json``: versions, rows and totals."""
    return {
        "versions": installed_versions(),
        "rows": [asdict(r) for r in rows],
        "passed": sum(r.status == "pass" for r in rows),
        "failed": sum(r.status == "fail" for r in rows),
    }


def write_json(rows: Sequence[Row], path: str | Path) -> Path:
    """Write :func:`report` to ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report(rows), indent=2, sort_keys=True) + "\n")
    return path


def _optimized_step(backbone: str, technique: str) -> str:
    """Build with ``technique`` through the registry, run one training step, check gradients reach the adapters."""
    model = tiny_backbone(backbone, technique=technique).train()
    features = model(tiny_input(backbone))
    sum(f.float().pow(2).mean() for f in features).backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    expect(any(p.grad is not None for p in trained), "no trainable parameter received a gradient")
    return f"{model.optimized.technique}: {model.optimized.trainable_parameters} trainable"


@feature("int8")
def check_int8(backbone: str) -> str:
    """Int8 weights (bitsandbytes), one training step."""
    return _optimized_step(backbone, "int8")


@feature("nf4")
def check_nf4(backbone: str) -> str:
    """Nf4 weights (bitsandbytes, experts too), one training step."""
    return _optimized_step(backbone, "nf4")


@feature("qlora")
def check_qlora(backbone: str) -> str:
    """QLoRA (nf4 + dq + LoRA) with activation checkpointing, one training step."""
    return _optimized_step(backbone, "qlora+ckpt")


#: Language layers the ``language`` check runs (of the tiny language model's 4).
CHECK_LANGUAGE_LAYERS = 2


@feature("language")
def check_language(backbone: str) -> str:
    """Language layers after the projector (``language_layers``), under QLoRA + checkpointing, through UperNet."""
    from earthmind_compat.backbones.base import argument_names

    if "language_layers" not in argument_names(backbone_class(backbone).__init__):
        return "n/a: no language model after a projector"
    model = build_model(
        backbone,
        "UperNetDecoder",
        num_classes=2,
        preset="tiny",
        in_chans=TINY_BANDS,
        language_layers=CHECK_LANGUAGE_LAYERS,
        out_indices=[1, -2, -1],
        technique="qlora+ckpt",
    )
    encoder = model.encoder
    x = tiny_input(backbone)
    with torch.no_grad():
        features = encoder.eval()(x)
    rows, cols = encoder.grid_size(x.shape[-2], x.shape[-1])
    merged = (2, rows * cols // 4, encoder.text_hidden_size)
    expect([tuple(f.shape) for f in features[1:]] == [merged] * 2, f"language features {features[1].shape}")
    model.train()
    output = model(x).output
    output.float().mean().backward()
    adapters = [p for n, p in encoder.language_model.named_parameters() if "lora_" in n]
    expect(adapters and all(p.grad is not None for p in adapters), "no gradient reached the language layers' LoRA")
    return f"{CHECK_LANGUAGE_LAYERS} layers x {list(merged)}, qlora+ckpt, UperNet -> {list(output.shape)}"
