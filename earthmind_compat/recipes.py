"""Recommended neck chains per backbone x decoder, checked before a model is built.

A token backbone (``[B, N, C]`` per layer, maybe with a CLS token) has to reach decoders that expect
image-shaped maps, often a halving pyramid. :func:`recommend` returns the neck chain and decoder
arguments that make each supported decoder work, :func:`build_model` builds the model through
TerraTorch's real ``EncoderDecoderFactory`` from just a backbone and a decoder name, and
:func:`check_chain` rejects an impossible combination with a :class:`ConfigurationError` naming the fix
before anything reaches a decoder.

Chains (``p`` = ``backbone.patch_size``, ``cls`` = ``backbone.has_cls_token``, K = number of features):

- every decoder: ``TokensToGrid(patch_size=p, cls_token=cls)`` (with ``merge_factors=backbone.merge_factors``
  when some features lie on a merged grid), then ``ProjectChannels(width)`` if a ``width`` is asked for;
- pyramid decoders (``UperNetDecoder``, ``UNetDecoder``, ``smp_*``): then ``SelectIndices`` spreading the K
  features over exactly 4 (only when K != 4) and TerraTorch's ``LearnedInterpolateToPyramidal``
  (x4, x2, x1, x0.5);
- ``FCNDecoder``, ``IdentityDecoder``, ``LinearDecoder`` and classification / scalar regression
  (``IdentityDecoder`` into TerraTorch's ``ScalarHead``, which averages over positions): nothing more.

What the recipes know of each neck and decoder is data: :data:`NECK_RULES` and :data:`DECODER_RULES`, each
rule with the checks :func:`check_chain` runs for it. A new neck or decoder is one entry there.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from terratorch.registry import DECODER_REGISTRY, NECK_REGISTRY
from torch import nn

from earthmind_compat.builders import backbone_builder, build_backbone
from earthmind_compat.compat import FACTORY_TASKS_SINCE, factory_takes_num_outputs, factory_tasks, installed_version
from earthmind_compat.errors import ConfigurationError, EarthMindCompatError, did_you_mean, unknown_name

#: TerraTorch task names, and the decoder each uses when none is given.
DEFAULT_DECODER: dict[str, str] = {
    "segmentation": "UperNetDecoder",
    "regression": "UperNetDecoder",
    "classification": "IdentityDecoder",
    "scalar_regression": "IdentityDecoder",
}
SCALAR_TASKS = ("classification", "scalar_regression")

#: What a feature list is, as necks and decoders see it: ``[B, N, C]`` tokens, ``[B, C, H, W]`` maps, pooled
#: ``[B, C]`` vectors, or unknown (after a neck without a rule, where the form checks end).
TOKENS, MAPS, VECTORS, UNKNOWN = "tokens", "maps", "vectors", "unknown"


@dataclass(frozen=True)
class FeatureLayout:
    """What a backbone returns, as far as necks and decoders care.

    Attributes:
        out_channels: Channels of each returned feature.
        patch_size: Side of one patch in pixels.
        has_cls_token: Whether full-resolution token tensors start with a CLS token.
        in_chans: Number of input bands.
        merge_factors: Per feature, how many patches per side one token covers (2 on InternVL's projector and the
            language layers); empty means 1 for every feature.
    """

    out_channels: tuple[int, ...]
    patch_size: int
    has_cls_token: bool
    in_chans: int
    merge_factors: tuple[int, ...] = ()

    @property
    def has_merged_features(self) -> bool:
        """Whether some features lie on a merged token grid (InternVL's projector, the language layers)."""
        return any(factor > 1 for factor in self.merge_factors)


def layout_of(backbone: nn.Module) -> FeatureLayout:
    """Read the :class:`FeatureLayout` of a built token backbone.

    Raises:
        ConfigurationError: if the module lacks ``out_channels``, ``patch_size`` or ``has_cls_token``.
    """
    missing = [a for a in ("out_channels", "patch_size", "has_cls_token", "in_chans") if not hasattr(backbone, a)]
    if missing:
        raise ConfigurationError(
            f"{type(backbone).__name__} has no {', '.join(missing)}; the recipes need a token backbone of "
            "earthmind-compat (or one exposing out_channels, patch_size, has_cls_token and in_chans). "
            "Pass necks=[...] yourself for other backbones."
        )
    patch = backbone.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    return FeatureLayout(
        out_channels=tuple(int(c) for c in backbone.out_channels),
        patch_size=patch,
        has_cls_token=bool(backbone.has_cls_token),
        in_chans=int(backbone.in_chans),
        merge_factors=tuple(int(f) for f in getattr(backbone, "merge_factors", ())),
    )


def layout_of_name(name: str, **backbone_kwargs: object) -> FeatureLayout:
    """The :class:`FeatureLayout` of one of our backbones, built on the meta device (no memory, no weights).

    Args:
        name: A name from :data:`earthmind_compat.BACKBONES`.
        **backbone_kwargs: Constructor arguments; ``weights`` and ``pretrained`` are ignored here.
    """
    builder = backbone_builder(name)
    kwargs = {k: v for k, v in backbone_kwargs.items() if k not in ("weights", "pretrained", "allow_pickle")}
    with torch.device("meta"):
        return layout_of(builder(**kwargs))


def spread_indices(count: int, wanted: int = 4) -> list[int]:
    """``wanted`` indices spread evenly over ``count`` features, first and last included (repeats if fewer)."""
    if count == 1:
        return [0] * wanted
    return [round(i * (count - 1) / (wanted - 1)) for i in range(wanted)]


# -- the rule tables: what each neck and decoder needs, as data with its own checks --------------------------


@dataclass(frozen=True)
class Step:
    """One step of a chain being checked: a neck or the decoder, and the features that reach it.

    Attributes:
        layout: The backbone's :class:`FeatureLayout`.
        where: The step, for messages (``"Neck 1 (SelectIndices)"`` or the decoder's name).
        arguments: The neck's or the decoder's arguments.
        kind: :data:`TOKENS`, :data:`MAPS`, :data:`VECTORS` or :data:`UNKNOWN`: the features reaching it.
        channels: Their channels.
        pyramid: Whether they form a halving pyramid.
        hint: The recommended chain, in a sentence to append to a message (or ``""``).
    """

    layout: FeatureLayout
    where: str
    arguments: Mapping
    kind: str
    channels: list[int]
    pyramid: bool
    hint: str


#: A check of one rule: raises :class:`ConfigurationError` naming the fix when the step cannot work.
Check = Callable[[Step], None]


def _grid_from_tokens(step: Step) -> str:
    layout = step.layout
    return f"TokensToGrid(patch_size={layout.patch_size}, cls_token={layout.has_cls_token})"


def _tokens_to_grid_fits(step: Step) -> None:
    """TokensToGrid on tokens: its ``cls_token`` and ``patch_size`` are the backbone's."""
    layout, arguments = step.layout, step.arguments
    if step.kind != TOKENS:
        return
    if arguments.get("cls_token", False) != layout.has_cls_token:
        raise ConfigurationError(
            f"{step.where} has cls_token={arguments.get('cls_token', False)} but backbone.has_cls_token is "
            f"{layout.has_cls_token}; set cls_token: {str(layout.has_cls_token).lower()}."
        )
    if arguments.get("patch_size") != layout.patch_size:
        raise ConfigurationError(
            f"{step.where} has patch_size={arguments.get('patch_size')} but the backbone's patch size is "
            f"{layout.patch_size}; set patch_size: {layout.patch_size}."
        )


def _reshape_tokens_fits(step: Step) -> None:
    """TerraTorch's ReshapeTokensToImage on tokens: it removes a CLS token exactly when there is one."""
    layout = step.layout
    if step.kind != TOKENS:
        return
    remove = step.arguments.get("remove_cls_token", True)
    if bool(remove) != layout.has_cls_token:
        state = "has a CLS token" if layout.has_cls_token else "has no CLS token"
        raise ConfigurationError(
            f"{step.where} has remove_cls_token={remove} but the backbone {state}: TerraTorch would drop a patch "
            "token (or keep the CLS token) and reshape into a wrong grid, silently when the count happens to be "
            f"square. Use {_grid_from_tokens(step)}.{step.hint}"
        )
    if layout.has_merged_features:
        raise ConfigurationError(
            f"{step.where} cannot reshape the projector's merged tokens next to the tower's (it removes the CLS "
            f"token from every feature). Use TokensToGrid.{step.hint}"
        )


def _needs_maps(step: Step) -> None:
    """The neck works on image-shaped maps (unknown features, after a neck without a rule, are let through)."""
    if step.kind not in (MAPS, UNKNOWN):
        raise ConfigurationError(
            f"{step.where} needs image-shaped maps [B, C, H, W] but gets {step.kind}; put "
            f"{_grid_from_tokens(step)} before it.{step.hint}"
        )


def _four_features(step: Step) -> None:
    """LearnedInterpolateToPyramidal builds its four scales from exactly four features."""
    if len(step.channels) != 4:
        raise ConfigurationError(
            f"{step.where} needs exactly 4 features but gets {len(step.channels)}; put "
            f"SelectIndices(indices={spread_indices(len(step.channels))}) before it or use 4 out_indices.{step.hint}"
        )


def _wide_enough(step: Step) -> None:
    """LearnedInterpolateToPyramidal divides the first two features' channels by 4 and by 2."""
    if min(step.channels[:2]) < 4:
        raise ConfigurationError(
            f"{step.where} divides the first two features' channels by 4 and 2; {step.channels[:2]} is too narrow. "
            "Use width >= 4."
        )


def _indices_in_range(step: Step) -> None:
    """SelectIndices picks existing features."""
    indices, count = step.arguments.get("indices"), len(step.channels)
    if (
        not isinstance(indices, Sequence)
        or not indices
        or any(isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count for i in indices)
    ):
        raise ConfigurationError(
            f"{step.where} has indices={indices!r}; there are {count} features, so use a non-empty list of "
            f"integers in {-count}..{count - 1}."
        )


def _needs_pyramid(step: Step) -> None:
    """The decoder reads a halving pyramid of maps."""
    if not step.pyramid:
        raise ConfigurationError(
            f"{step.where} needs a halving pyramid of maps, but the necks keep every map at the patch grid; add "
            "LearnedInterpolateToPyramidal (after SelectIndices to 4 features)." + step.hint
        )


def _one_unet_channel_per_feature(step: Step) -> None:
    """UNetDecoder takes one decoder channel entry per feature."""
    channels = step.arguments.get("channels")
    if not isinstance(channels, Sequence) or len(channels) != len(step.channels):
        raise ConfigurationError(
            f"UNetDecoder needs one decoder channel entry per feature: {len(step.channels)} features reach it, "
            f"channels={channels!r}; e.g. decoder_channels: "
            f"{[max(1, 256 >> i) for i in range(len(step.channels))]}." + step.hint
        )


def _linear_decoder_arguments(step: Step) -> None:
    """LinearDecoder gets ``upsampling_size`` and ``num_classes`` as decoder arguments."""
    missing = [k for k in ("upsampling_size", "num_classes") if k not in step.arguments]
    if missing:
        raise ConfigurationError(
            f"LinearDecoder needs decoder_{' and decoder_'.join(missing)}: upsampling_size = the patch size "
            f"{step.layout.patch_size} gives the input's size, and TerraTorch's factory does not pass num_classes "
            "to this decoder itself." + step.hint
        )


def _to_maps(kind: str) -> str:
    return MAPS if kind in (TOKENS, MAPS) else kind


@dataclass(frozen=True)
class NeckRule:
    """What a neck needs and does to the features, for :func:`check_chain`.

    Attributes:
        checks: Run in order before the neck is built.
        becomes: The kind of features it returns, from the kind it gets (unchanged by default).
        pyramid: It returns a halving pyramid.
    """

    checks: tuple[Check, ...] = ()
    becomes: Callable[[str], str] = field(default=lambda kind: kind)
    pyramid: bool = False


#: Necks whose effect :func:`check_chain` follows; any other registered neck ends the form checks.
NECK_RULES: dict[str, NeckRule] = {
    "TokensToGrid": NeckRule(checks=(_tokens_to_grid_fits,), becomes=_to_maps),
    "ReshapeTokensToImage": NeckRule(checks=(_reshape_tokens_fits,), becomes=_to_maps),
    "AggregateTokens": NeckRule(becomes=lambda kind: VECTORS),
    "LearnedInterpolateToPyramidal": NeckRule(checks=(_needs_maps, _four_features, _wide_enough), pyramid=True),
    "InterpolateToPyramidal": NeckRule(checks=(_needs_maps,), pyramid=True),
    "MaxpoolToPyramidal": NeckRule(checks=(_needs_maps,), pyramid=True),
    "AddBottleneckLayer": NeckRule(checks=(_needs_maps,)),
    "FeaturePyramidNetworkNeck": NeckRule(checks=(_needs_maps,)),
    "SelectIndices": NeckRule(checks=(_indices_in_range,)),
    "ProjectChannels": NeckRule(),
}
_UNKNOWN_NECK = NeckRule(becomes=lambda kind: UNKNOWN)


@dataclass(frozen=True)
class DecoderRule:
    """How a decoder is fed.

    Attributes:
        pyramid: The recommended chain builds a halving pyramid of 4 maps (``LearnedInterpolateToPyramidal``).
        defaults: Decoder arguments from (backbone layout, decoder width, number of classes or outputs).
        checks: What :func:`check_chain` checks of the maps reaching it (for pixel-wise tasks), in order.
    """

    pyramid: bool = False
    defaults: Callable[[FeatureLayout, int, int | None], dict] = field(default=lambda layout, width, outputs: {})
    checks: tuple[Check, ...] = ()


#: Decoders with a recommended chain. Any other ``smp_<Name>`` decoder is fed like ``smp_FPN``.
DECODER_RULES: dict[str, DecoderRule] = {
    "FCNDecoder": DecoderRule(defaults=lambda layout, width, outputs: {"channels": width}),
    # A pyramid is recommended but not required: UperNet's FPN also merges four maps of one size, as
    # TerraTorch's own ViT configurations feed it.
    "UperNetDecoder": DecoderRule(pyramid=True, defaults=lambda layout, width, outputs: {"channels": width}),
    "UNetDecoder": DecoderRule(
        pyramid=True,
        defaults=lambda layout, width, outputs: {"channels": [max(1, width >> i) for i in range(4)]},
        checks=(_needs_pyramid, _one_unet_channel_per_feature),
    ),
    "IdentityDecoder": DecoderRule(),
    # TerraTorch's factory never hands num_classes to LinearDecoder (it reads includes_head from the registry,
    # not the class), so the recipe passes it as a decoder argument; a 1x1 head then follows.
    "LinearDecoder": DecoderRule(
        defaults=lambda layout, width, outputs: (
            {"upsampling_size": layout.patch_size} | ({"num_classes": outputs} if outputs else {})
        ),
        checks=(_linear_decoder_arguments,),
    ),
    "smp_FPN": DecoderRule(
        pyramid=True,
        # smp's FPN segmentation blocks use GroupNorm(32, ...): a multiple of 32 channels, and at least 64 so
        # that each group keeps 2 values on the 1 x 1 coarsest map of a small tile (batch 1).
        defaults=lambda layout, width, outputs: {
            "decoder_pyramid_channels": width,
            "decoder_segmentation_channels": 32 * max(2, width // 64),
        },
        checks=(_needs_pyramid,),
    ),
}
#: The rule of every other ``smp_<Name>`` decoder of TerraTorch's registry.
SMP_RULE = DecoderRule(pyramid=True, checks=(_needs_pyramid,))


def _known_rule(decoder: str) -> DecoderRule | None:
    return DECODER_RULES.get(decoder) or (SMP_RULE if decoder.startswith("smp_") else None)


def decoder_rule(decoder: str) -> DecoderRule:
    """The :class:`DecoderRule` of ``decoder``.

    Raises:
        UnknownNameError: for a decoder without a recommended chain, with the closest names.
    """
    rule = _known_rule(decoder)
    if rule is SMP_RULE and decoder not in DECODER_REGISTRY:
        rule = None
    if rule is None:
        raise unknown_name("decoder", decoder, DECODER_RULES)
    return rule


@dataclass
class Recipe:
    """A neck chain and decoder arguments for one backbone x decoder x task.

    Attributes:
        task: TerraTorch task name (``segmentation``, ``regression``, ``classification``...).
        decoder: TerraTorch decoder name.
        necks: Neck specifications as TerraTorch's ``necks`` argument takes them.
        decoder_kwargs: Decoder arguments (without the ``decoder_`` prefix).
    """

    task: str
    decoder: str
    necks: list[dict]
    decoder_kwargs: dict

    def model_args(self, backbone: str, **extra: object) -> dict:
        """``EncoderDecoderFactory`` arguments, as the ``model_args`` of a TerraTorch YAML config.

        Args:
            backbone: Backbone name.
            **extra: More arguments (``backbone_preset``, ``num_classes``...), added as given.
        """
        args: dict = {"backbone": backbone, **extra, "necks": copy.deepcopy(self.necks), "decoder": self.decoder}
        args.update({f"decoder_{k}": copy.deepcopy(v) for k, v in self.decoder_kwargs.items()})
        return args


def _check_task(task: str) -> str:
    if task not in DEFAULT_DECODER:
        raise unknown_name("task", task, DEFAULT_DECODER)
    if task not in factory_tasks():
        raise ConfigurationError(
            f"TerraTorch {installed_version('terratorch')} cannot build a {task} model (its EncoderDecoderFactory "
            f"builds {', '.join(factory_tasks())}); {task} needs TerraTorch >= {FACTORY_TASKS_SINCE.get(task, '1.2')}."
        )
    return task


def _output_arguments(task: str, num_classes: int | None, num_outputs: int | None) -> dict:
    """``num_classes`` / ``num_outputs`` for the installed factory (TerraTorch 1.0 has no ``num_outputs``)."""
    if num_outputs is None:
        return {"num_classes": num_classes} if task in ("segmentation", "classification") else {}
    if factory_takes_num_outputs():
        return {"num_outputs": num_outputs}
    if num_outputs == 1:
        return {}  # TerraTorch 1.0's regression head has exactly one output
    raise ConfigurationError(
        f"TerraTorch {installed_version('terratorch')} regresses exactly one output per pixel; num_outputs="
        f"{num_outputs} needs TerraTorch >= 1.1."
    )


def recommend(
    backbone: str | nn.Module | FeatureLayout,
    decoder: str | None = None,
    task: str = "segmentation",
    *,
    width: int | None = None,
    decoder_width: int | None = None,
    outputs: int | None = None,
    **backbone_kwargs: object,
) -> Recipe:
    """The recommended neck chain and decoder arguments for a backbone and a decoder.

    Args:
        backbone: A backbone name (inspected on the meta device), a built backbone, or its layout.
        decoder: A decoder name from :data:`DECODER_RULES` (or any ``smp_<Name>``); default per task
            (:data:`DEFAULT_DECODER`).
        task: TerraTorch task name.
        width: If given, project every feature to this many channels first (``ProjectChannels``).
        decoder_width: Decoder channels (default: ``min(256, widest feature)``).
        outputs: Number of classes (or outputs); needed by decoders that include their head (LinearDecoder).
        **backbone_kwargs: Constructor arguments when ``backbone`` is a name (``out_indices``...).

    Returns:
        The :class:`Recipe`.

    Raises:
        UnknownNameError: for an unknown task, decoder or backbone name.
        ConfigurationError: for a width that the chain cannot use.
    """
    task = _check_task(task)
    decoder = decoder or DEFAULT_DECODER[task]
    rule = decoder_rule(decoder)
    if isinstance(backbone, FeatureLayout):
        layout = backbone
    elif isinstance(backbone, nn.Module):
        layout = layout_of(backbone)
    else:
        layout = layout_of_name(backbone, **backbone_kwargs)
    necks: list[dict] = [{"name": "TokensToGrid", "patch_size": layout.patch_size, "cls_token": layout.has_cls_token}]
    if layout.has_merged_features:  # places merged features on the patch grid where TerraTorch 1.0 gives no image size
        necks[0]["merge_factors"] = list(layout.merge_factors)
    channels = list(layout.out_channels)
    if width is not None:
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigurationError(f"width must be a positive integer, got {width!r}.")
        necks.append({"name": "ProjectChannels", "out_channels": width})
        channels = [width] * len(channels)
    if rule.pyramid:
        if len(channels) != 4:
            indices = spread_indices(len(channels))
            necks.append({"name": "SelectIndices", "indices": indices})
            channels = [channels[i] for i in indices]
        _wide_enough(
            Step(
                layout, f"{decoder} is fed through LearnedInterpolateToPyramidal, which", {}, MAPS, channels, False, ""
            )
        )
        necks.append({"name": "LearnedInterpolateToPyramidal"})
    if decoder_width is None:
        decoder_width = min(256, max(channels))
    defaults = rule.defaults(layout, int(decoder_width), outputs)
    return Recipe(task=task, decoder=decoder, necks=necks, decoder_kwargs=defaults)


# -- checking a chain before it is built ------------------------------------------------------------------


def _neck_names() -> list[str]:
    return sorted({name for source in NECK_REGISTRY.keys() for name in NECK_REGISTRY[source]})  # noqa: SIM118


def _fix_hint(layout: FeatureLayout, decoder: str, task: str) -> str:
    try:
        chain = recommend(layout, decoder, task).necks
    except EarthMindCompatError:
        return ""
    return f" The recommended chain for {decoder} is necks={chain}."


def check_chain(
    layout: FeatureLayout,
    necks: Sequence[Mapping],
    decoder: str,
    task: str = "segmentation",
    decoder_kwargs: Mapping | None = None,
) -> list[int]:
    """Check that ``necks`` turn the backbone's features into what ``decoder`` and the task head need.

    It follows the features through the chain (tokens, maps or pooled vectors; how many; which channels,
    using each real neck's ``process_channel_list``) and raises on the first step that cannot work, naming
    the step and the fix. Necks it does not know end the form checks (their channels are still followed).

    Args:
        layout: The backbone's :class:`FeatureLayout`.
        necks: Neck specifications (``{"name": ..., **arguments}``).
        decoder: Decoder name.
        task: TerraTorch task name.
        decoder_kwargs: Decoder arguments (without prefix).

    Returns:
        The channel list the decoder receives.

    Raises:
        ConfigurationError: for an impossible combination.
        UnknownNameError: for an unknown neck or task name.
    """
    task = _check_task(task)
    decoder_kwargs = dict(decoder_kwargs or {})
    hint = _fix_hint(layout, decoder, task)
    kind = TOKENS
    pyramid = False
    channels = list(layout.out_channels)
    for position, spec in enumerate(necks):
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ConfigurationError(f"Neck {position} must be a mapping with a 'name' key, got {spec!r}.")
        name = spec["name"]
        arguments = {k: v for k, v in spec.items() if k != "name"}
        if name not in NECK_REGISTRY:
            raise unknown_name("neck", name, _neck_names())
        where = f"Neck {position} ({name})"
        rule = NECK_RULES.get(name, _UNKNOWN_NECK)
        for check in rule.checks:
            check(Step(layout, where, arguments, kind, channels, pyramid, hint))
        try:
            neck = NECK_REGISTRY.build(name, list(channels), **arguments)
            channels = list(neck.process_channel_list(list(channels)))
        except EarthMindCompatError:
            raise
        except Exception as exc:
            raise ConfigurationError(
                f"{where} could not be built for features with channels {channels}: {type(exc).__name__}: {exc}"
            ) from exc
        kind = rule.becomes(kind)
        pyramid = pyramid or rule.pyramid
    _check_decoder(Step(layout, decoder, decoder_kwargs, kind, channels, pyramid, hint), task)
    return channels


def _check_decoder(step: Step, task: str) -> None:
    """What the task's head needs of the features, then the decoder's own checks (pixel-wise tasks)."""
    if step.kind == UNKNOWN:
        return
    if task in SCALAR_TASKS:
        if step.kind == TOKENS:
            raise ConfigurationError(
                f"{task} would feed [B, N, C] tokens to TerraTorch's ScalarHead, which treats dimension 1 as "
                "channels (N tokens, not C); put TokensToGrid (or AggregateTokens) first." + step.hint
            )
        return
    if step.kind != MAPS:
        what = "[B, N, C] tokens" if step.kind == TOKENS else "pooled [B, C] vectors"
        raise ConfigurationError(
            f"{step.where} for {task} needs image-shaped maps [B, C, H, W] but the necks give {what}; "
            f"put {_grid_from_tokens(step)} first.{step.hint}"
        )
    rule = _known_rule(step.where)
    for check in rule.checks if rule is not None else ():
        check(step)


# -- building -----------------------------------------------------------------------------------------------


def build_model(
    backbone: str | nn.Module,
    decoder: str | None = None,
    task: str = "segmentation",
    *,
    num_classes: int | None = None,
    num_outputs: int | None = None,
    necks: Sequence[Mapping] | None = None,
    width: int | None = None,
    decoder_width: int | None = None,
    decoder_kwargs: Mapping | None = None,
    head_kwargs: Mapping | None = None,
    probe: bool = True,
    probe_size: int | None = None,
    **backbone_kwargs: object,
) -> nn.Module:
    """Build a TerraTorch model from a backbone and a decoder name, with the recommended necks.

    The chain is checked with :func:`check_chain`, the model is built by TerraTorch's real
    ``EncoderDecoderFactory``, and (with ``probe``) one forward pass on a small zero image in eval mode
    confirms the output shape, so a combination that cannot work fails here with a
    :class:`ConfigurationError`, not in the first training step.

    Args:
        backbone: One of our backbone names, or a built backbone.
        decoder: Decoder name (default per task: :data:`DEFAULT_DECODER`).
        task: ``segmentation``, ``regression``, ``classification`` or ``scalar_regression``.
        num_classes: Classes, for segmentation and classification.
        num_outputs: Outputs, for regression tasks (default 1).
        necks: Your own neck chain instead of the recommended one (it is checked all the same).
        width: Project every feature to this many channels first (recommended chain only).
        decoder_width: Decoder channels of the recommended arguments (default ``min(256, widest)``).
        decoder_kwargs: Decoder arguments that override the recommended ones.
        head_kwargs: Head arguments (``dropout``...).
        probe: Run the shape probe.
        probe_size: Side of the probe image in pixels (default 4 patches).
        **backbone_kwargs: Backbone constructor arguments (``preset``, ``bands``, ``out_indices``...).

    Returns:
        TerraTorch's ``PixelWiseModel`` or ``ScalarOutputModel``.

    Raises:
        ConfigurationError: for an impossible combination or missing arguments.
        UnknownNameError: for an unknown backbone, decoder, neck or task name.
    """
    # deferred: importing earthmind_compat from TerraTorch's custom_modules happens while terratorch.models is
    # still being imported
    from terratorch.models import EncoderDecoderFactory

    task = _check_task(task)
    decoder = decoder or DEFAULT_DECODER[task]
    if task in ("segmentation", "classification") and num_classes is None:
        raise ConfigurationError(f"{task} needs num_classes.")
    if task in ("regression", "scalar_regression") and num_classes is not None:
        raise ConfigurationError(f"{task} takes num_outputs, not num_classes.")
    for name, value in (("num_classes", num_classes), ("num_outputs", num_outputs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigurationError(f"{name} must be a positive integer, got {value!r}.")
    if isinstance(backbone, nn.Module):
        if backbone_kwargs:
            raise ConfigurationError(
                f"Backbone arguments {sorted(backbone_kwargs)} were given with an already built backbone; "
                "pass a backbone name to build it with them."
            )
        module = backbone
    else:
        module = build_backbone(backbone, **backbone_kwargs)
    layout = layout_of(module)
    if necks is None:
        recipe = recommend(
            layout, decoder, task, width=width, decoder_width=decoder_width, outputs=num_classes or num_outputs
        )
        chain = recipe.necks
        arguments = {**recipe.decoder_kwargs, **dict(decoder_kwargs or {})}
    else:
        if decoder not in DECODER_RULES and decoder not in DECODER_REGISTRY:
            raise unknown_name("decoder", decoder, DECODER_RULES)
        chain = [dict(spec) for spec in necks]
        arguments = dict(decoder_kwargs or {})
    check_chain(layout, chain, decoder, task, arguments)
    outputs = _output_arguments(task, num_classes, num_outputs)
    padding = {"padding": backbone_kwargs["padding"]} if "padding" in backbone_kwargs else {}
    try:
        model = EncoderDecoderFactory().build_model(
            task,
            backbone=module,
            decoder=decoder,
            necks=copy.deepcopy(chain),
            backbone_kwargs=padding,
            decoder_kwargs=arguments,
            head_kwargs=dict(head_kwargs or {}),
            **outputs,
        )
    except EarthMindCompatError:
        raise
    except Exception as exc:
        raise ConfigurationError(
            f"TerraTorch could not build the {task} model (necks {[n['name'] for n in chain]} -> {decoder} "
            f"with {arguments}): {type(exc).__name__}: {exc}"
        ) from exc
    if probe:
        probe_model(model, layout, task, num_classes or num_outputs or 1, probe_size)
    return model


def expected_output_shape(task: str, batch: int, outputs: int, height: int, width: int) -> tuple[int, ...]:
    """Shape of ``model(x).output`` for a ``[batch, bands, height, width]`` input.

    TerraTorch squeezes a single output channel of pixel-wise models: ``[B, H, W]``.
    """
    if task in SCALAR_TASKS:
        return (batch, outputs)
    return (batch, height, width) if outputs == 1 else (batch, outputs, height, width)


def probe_model(
    model: nn.Module, layout: FeatureLayout, task: str, outputs: int, size: int | None = None
) -> tuple[int, ...]:
    """Run one eval-mode forward pass on a zero image and check the output shape.

    Raises:
        ConfigurationError: if the forward pass fails or the shape is not the expected one.
    """
    size = size or 4 * layout.patch_size
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(torch.zeros(1, layout.in_chans, size, size, device=device)).output
    except EarthMindCompatError:
        raise
    except Exception as exc:
        raise ConfigurationError(
            f"The built {task} model fails on a 1x{layout.in_chans}x{size}x{size} probe image: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    expected = expected_output_shape(task, 1, outputs, size, size)
    if tuple(output.shape) != expected:
        raise ConfigurationError(
            f"The built {task} model returns {tuple(output.shape)} for a {size}x{size} probe image, expected "
            f"{expected}."
        )
    return expected


class RecipeFactory:
    """A TerraTorch model factory that fills in the recommended necks: YAML names only backbone and decoder.

    Registered in TerraTorch's ``MODEL_FACTORY_REGISTRY`` it is used as ``model_factory: RecipeFactory``,
    with ``model_args`` such as ``backbone``, ``decoder``, ``num_classes`` and ``backbone_*`` / ``decoder_*``
    / ``head_*`` keys as for ``EncoderDecoderFactory``, plus ``necks``, ``width``, ``decoder_width``,
    ``probe`` and ``probe_size`` of :func:`build_model`.
    """

    _OPTIONS = ("necks", "width", "decoder_width", "probe", "probe_size", "num_classes", "num_outputs")

    def build_model(
        self,
        task: str,
        backbone: str | nn.Module,
        decoder: str | None = None,
        aux_decoders: Sequence | None = None,
        **kwargs: object,
    ) -> nn.Module:
        """Build the model with :func:`build_model`; arguments as ``EncoderDecoderFactory.build_model``.

        Raises:
            ConfigurationError: for auxiliary decoders or unknown arguments.
        """
        if aux_decoders:
            raise ConfigurationError(
                "RecipeFactory does not build auxiliary decoders; use EncoderDecoderFactory with the necks of "
                "earthmind_compat.recipes.recommend(...)."
            )
        groups: dict[str, dict] = {"backbone_": {}, "decoder_": {}, "head_": {}}
        options: dict = {}
        unknown = []
        for key, value in kwargs.items():
            prefix = next((p for p in groups if key.startswith(p)), None)
            if prefix is not None:
                groups[prefix][key.removeprefix(prefix)] = value
            elif key in self._OPTIONS:
                options[key] = value
            else:
                unknown.append(key)
        if unknown:
            hints = "".join(did_you_mean(k, self._OPTIONS) for k in unknown)
            raise ConfigurationError(
                f"RecipeFactory got unknown model_args {sorted(unknown)}.{hints} Valid: backbone, decoder, "
                f"{', '.join(self._OPTIONS)} and backbone_* / decoder_* / head_* keys."
            )
        return build_model(
            backbone,
            decoder,
            task,
            decoder_kwargs=groups["decoder_"] or None,
            head_kwargs=groups["head_"] or None,
            **options,
            **groups["backbone_"],
        )


#: Model factories for :func:`earthmind_compat.registry.register_all` to register (by class name).
MODEL_FACTORIES: tuple[type, ...] = (RecipeFactory,)
