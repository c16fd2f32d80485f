"""The key maps of InternVL-family checkpoints, and the translation of their configs, as data.

Four layouts hold an InternViT tower (and maybe its projector) and are read by
:mod:`earthmind_compat.backbones.loader`:

* native ``InternVLForConditionalGeneration`` / ``InternVLModel`` directories (``model_type`` ``internvl``, the
  ``-hf`` repositories): the tower under ``(model.)vision_tower.``, the projector under
  ``(model.)multi_modal_projector.``;
* native ``InternVLVisionModel`` directories (``internvl_vision``): the tower alone, unprefixed;
* InternVL's own release (``internvl_chat``, e.g. ``OpenGVLab/InternVL2_5-4B``), in the key layout of its
  remote code: an ``InternVisionModel`` under ``vision_model.`` with a fused ``qkv`` projection and the
  projector as the ``nn.Sequential`` ``mlp1``;
* EarthMind's release (``sa2va_chat``): the same plus the gating queries ``local_query``, the SAM2 grounding
  encoder and ``text_hidden_fcs``.

Nothing of the remote code is run: ``config.json`` is read as data (its missing keys take the defaults of the
released configuration classes, :data:`REMOTE_VISION_DEFAULTS` and :data:`REMOTE_CHAT_DEFAULTS`) and the
tensors are renamed by a :class:`KeyRule` table into the names of ``transformers``' native
``InternVLVisionModel`` and ``InternVLMultiModalProjector`` and of our
:class:`~earthmind_compat.backbones.fusion.CrossModalGate`.

Every map is strict: every tensor of the checkpoint must match exactly one rule (a rename, or a skip with a
stated reason), and every native tensor must be filled with a tensor of the right shape; otherwise
:class:`~earthmind_compat.errors.WeightsError` lists the missing and unexpected keys, before any tensor is read.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from earthmind_compat.errors import WeightsError

#: ``model_type`` values of the released remote-code chat configs: InternVL's and EarthMind's.
REMOTE_MODEL_TYPES = ("internvl_chat", "sa2va_chat")

#: ``model_type`` of the released standalone InternViT config (``configuration_intern_vit.py``).
REMOTE_VISION_MODEL_TYPE = "intern_vit_6b"

#: Prefixes of the native layout produced by :func:`convert_checkpoint`.
VISION_PREFIX, PROJECTOR_PREFIX, GATE_PREFIX = "vision_tower.", "projector.", "gate."


@dataclass(frozen=True)
class KeyRule:
    """One entry of a key map.

    Attributes:
        pattern: Regular expression that must match a whole checkpoint key.
        targets: Native key templates (``re`` replacement syntax). Several targets split the tensor into that
            many equal chunks along dimension 0 (the fused ``qkv``). Empty: the tensor is deliberately unused.
        reason: Why a skipped tensor is not part of the backbone.
    """

    pattern: str
    targets: tuple[str, ...] = ()
    reason: str = ""


_LANGUAGE_MODEL = "the Qwen2.5 language model reads the image tokens; not an image backbone"


def _internvit_rules(prefix: str) -> tuple[KeyRule, ...]:
    """The remote ``InternVisionModel``'s names under ``prefix`` -> native ``InternVLVisionModel`` names."""
    at = re.escape(prefix)
    layer, native = at + r"encoder\.layers\.(\d+)\.", VISION_PREFIX + r"encoder.layer.\1."
    return (
        KeyRule(at + r"embeddings\.class_embedding", (VISION_PREFIX + "embeddings.cls_token",)),
        KeyRule(
            at + r"embeddings\.patch_embedding\.(weight|bias)",
            (VISION_PREFIX + r"embeddings.patch_embeddings.projection.\1",),
        ),
        KeyRule(at + r"embeddings\.position_embedding", (VISION_PREFIX + "embeddings.position_embeddings",)),
        KeyRule(layer + r"attn\.qkv\.(weight|bias)", tuple(native + f"attention.{p}_proj." + r"\2" for p in "qkv")),
        KeyRule(layer + r"attn\.proj\.(weight|bias)", (native + r"attention.projection_layer.\2",)),
        KeyRule(layer + r"attn\.q_norm\.weight", (native + "attention.q_norm.weight",)),
        KeyRule(layer + r"attn\.k_norm\.weight", (native + "attention.k_norm.weight",)),
        KeyRule(layer + r"mlp\.(fc1|fc2)\.(weight|bias)", (native + r"mlp.\2.\3",)),
        KeyRule(layer + r"norm1\.(weight|bias)", (native + r"layernorm_before.\2",)),
        KeyRule(layer + r"norm2\.(weight|bias)", (native + r"layernorm_after.\2",)),
        KeyRule(layer + r"ls1", (native + "lambda_1",)),
        KeyRule(layer + r"ls2", (native + "lambda_2",)),
    )


#: The standalone InternViT release (``intern_vit_6b``, e.g. ``OpenGVLab/InternViT-6B-448px-V2_5``): the remote
#: ``InternVisionModel`` saved alone, unprefixed -> native names.
INTERNVIT_RULES: tuple[KeyRule, ...] = _internvit_rules("")

#: InternVL's remote-code names (``internvl_chat``, ``OpenGVLab/InternVL2_5-4B``) -> native names.
INTERNVL_CHAT_RULES: tuple[KeyRule, ...] = (
    *_internvit_rules("vision_model."),
    KeyRule(r"mlp1\.0\.(weight|bias)", (PROJECTOR_PREFIX + r"layer_norm.\1",)),
    KeyRule(r"mlp1\.1\.(weight|bias)", (PROJECTOR_PREFIX + r"linear_1.\1",)),
    KeyRule(r"mlp1\.3\.(weight|bias)", (PROJECTOR_PREFIX + r"linear_2.\1",)),
    KeyRule(r"language_model\..+", reason=_LANGUAGE_MODEL),
)

#: EarthMind's remote-code names (``sa2va_chat``, ``sy1998/EarthMind-4B``) -> native names: InternVL's map plus
#: the gating queries, and the parts that decode masks.
KEY_RULES: tuple[KeyRule, ...] = (
    *INTERNVL_CHAT_RULES,
    KeyRule(r"local_query", (GATE_PREFIX + "local_query",)),
    KeyRule(r"grounding_encoder\..+", reason="the SAM2 grounding encoder decodes masks from [SEG] tokens"),
    KeyRule(r"text_hidden_fcs\..+", reason="maps the language model's [SEG] states to SAM2 prompts"),
)

#: A native ``InternVLForConditionalGeneration`` (``model.`` prefixes, transformers 5.x and recent 4.x) or
#: ``InternVLModel`` / older ``-hf`` conversion (no ``model.``) -> native names.
NATIVE_MODEL_RULES: tuple[KeyRule, ...] = (
    KeyRule(r"(?:model\.)?vision_tower\.(.+)", (VISION_PREFIX + r"\1",)),
    KeyRule(r"(?:model\.)?multi_modal_projector\.(.+)", (PROJECTOR_PREFIX + r"\1",)),
    KeyRule(r"(?:model\.)?language_model\..+", reason=_LANGUAGE_MODEL),
    KeyRule(r"lm_head\..+", reason="the language model's output layer"),
)

#: A native ``InternVLVisionModel`` saved alone -> native names.
NATIVE_VISION_RULES: tuple[KeyRule, ...] = (KeyRule(r"(.+)", (VISION_PREFIX + r"\1",)),)

#: Defaults of the released ``InternVisionConfig`` (InternVL's ``configuration_intern_vit.py``; EarthMind ships
#: the same file) for every key of a remote ``vision_config`` that this package reads. They describe
#: InternViT-6B: a config that omits ``qkv_bias`` builds a tower *without* qkv bias, with qk normalisation and
#: RMS norms, whatever the 300M tower of InternVL2.5-4B uses (its released config states all three).
REMOTE_VISION_DEFAULTS: dict[str, object] = {
    "num_channels": 3,
    "patch_size": 14,
    "image_size": 224,
    "qkv_bias": False,
    "hidden_size": 3200,
    "num_attention_heads": 25,
    "intermediate_size": 12800,
    "qk_normalization": True,
    "num_hidden_layers": 48,
    "hidden_act": "gelu",
    "norm_type": "rms_norm",
    "layer_norm_eps": 1e-6,
}

#: Defaults of the released ``InternVLChatConfig`` / ``Sa2VAChatConfig`` for the keys read here. ``ps_version``
#: defaults to ``'v1'`` (the transposed pixel shuffle), which is refused: the released InternVL2.5 and
#: EarthMind configs state ``'v2'``.
REMOTE_CHAT_DEFAULTS: dict[str, object] = {"select_layer": -1, "downsample_ratio": 0.5, "ps_version": "v1"}


@dataclass(frozen=True)
class RemoteSettings:
    """What a checkpoint config says about the parts we build.

    Attributes:
        vision: Preset-style settings for :func:`~earthmind_compat.backbones.internvl.vision_config_from_preset`
            (with ``num_channels``, the released patch kernel's bands, and ``text_hidden_size``, the projector's
            output width, ``None`` when the checkpoint does not say).
        projector_layer: Index of the vision layer whose output feeds the projector (``select_layer`` /
            ``vision_feature_layer``).
    """

    vision: dict
    projector_layer: int


class TensorSource(Protocol):
    """What :func:`convert_checkpoint` reads: a checkpoint's config, tensor names, header shapes and tensors."""

    directory: Path
    config: Mapping[str, object]
    keys: Sequence[str]

    def shapes(self, keys: Iterable[str]) -> dict[str, tuple[int, ...]]: ...  # noqa: D102

    def load(self, keys: Iterable[str]) -> dict[str, torch.Tensor]: ...  # noqa: D102


def is_remote_config(config: dict) -> bool:
    """Whether a ``config.json`` is in one of the released remote-code formats (read as data)."""
    return config.get("model_type") in REMOTE_MODEL_TYPES


def _require(config: Mapping, key: str, directory: Path, what: str) -> object:
    if key not in config:
        raise WeightsError(f"{directory}/config.json has no {key!r}; it is not a complete {what} config.")
    return config[key]


def _projector_layer(select: int, layers: int, directory: Path, name: str) -> int:
    """The index of the vision layer whose output ``hidden_states[select]`` is (``hidden_states[0]``: patches)."""
    if not -(layers + 1) <= select <= layers:
        raise WeightsError(f"{directory}: {name}={select} is outside the {layers} vision layers.")
    layer = select % (layers + 1) - 1
    if layer < 0:
        raise WeightsError(f"{directory}: {name}={select} projects the patch embeddings, which is not supported.")
    return layer


def remote_settings(config: dict, directory: Path) -> RemoteSettings:
    """Translate a remote ``internvl_chat`` / ``sa2va_chat`` (or standalone ``intern_vit_6b``) config into settings.

    A key the config leaves out takes the released configuration classes' default
    (:data:`REMOTE_VISION_DEFAULTS`, :data:`REMOTE_CHAT_DEFAULTS`). The remote names ``qkv_bias`` /
    ``qk_normalization`` become ``attention_bias`` / ``use_qk_norm`` (the native config would silently ignore
    the remote names).

    Raises:
        WeightsError: if the config lacks what has no default (``vision_config``, ``llm_config.hidden_size``) or
            asks for something the native classes do not do.
    """
    model_type = config.get("model_type")
    if model_type == REMOTE_VISION_MODEL_TYPE:  # the tower alone: no projector, no language model
        vision, llm, chat = {**REMOTE_VISION_DEFAULTS, **config}, None, {**REMOTE_CHAT_DEFAULTS, "ps_version": "v2"}
    elif is_remote_config(config):
        vision = {**REMOTE_VISION_DEFAULTS, **_require(config, "vision_config", directory, str(model_type))}
        llm = _require(config, "llm_config", directory, str(model_type))
        chat = {**REMOTE_CHAT_DEFAULTS, **config}
    else:
        raise WeightsError(
            f"{directory} holds a {model_type!r} checkpoint; expected a remote InternVL layout (model_type "
            f"{', '.join(map(repr, (*REMOTE_MODEL_TYPES, REMOTE_VISION_MODEL_TYPE)))})."
        )
    if chat["downsample_ratio"] != 0.5:
        raise WeightsError(
            f"{directory}: downsample_ratio={chat['downsample_ratio']}; only InternVL's pixel shuffle 0.5 is supported."
        )
    if chat["ps_version"] != "v2":
        stated = "ps_version" in config
        raise WeightsError(
            f"{directory}: ps_version={chat['ps_version']!r}"
            + ("" if stated else " (config.json leaves it out; the released config class defaults to 'v1')")
            + ", the transposed pixel shuffle; only 'v2' (what InternVL2.5 and EarthMind release) is supported. "
            'Add "ps_version": "v2" to config.json if the checkpoint was trained with it.'
        )
    settings = {
        "hidden_size": int(vision["hidden_size"]),
        "num_hidden_layers": int(vision["num_hidden_layers"]),
        "num_attention_heads": int(vision["num_attention_heads"]),
        "intermediate_size": int(vision["intermediate_size"]),
        "image_size": int(vision["image_size"]),
        "patch_size": int(vision["patch_size"]),
        "num_channels": int(vision["num_channels"]),
        "attention_bias": bool(vision["qkv_bias"]),
        "use_qk_norm": bool(vision["qk_normalization"]),
        "norm_type": vision["norm_type"],
        "layer_norm_eps": float(vision["layer_norm_eps"]),
        "hidden_act": vision["hidden_act"],
        "use_mean_pooling": True,  # the remote tower has no final norm
        "text_hidden_size": None if llm is None else int(_require(llm, "hidden_size", directory, "llm_config")),
    }
    if settings["norm_type"] not in ("layer_norm", "rms_norm"):
        raise WeightsError(f"{directory}: unknown vision norm_type {settings['norm_type']!r}.")
    layer = _projector_layer(int(chat["select_layer"]), settings["num_hidden_layers"], directory, "select_layer")
    return RemoteSettings(settings, layer)


#: The native vision settings this package builds from (the keys of a preset).
_NATIVE_VISION_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "attention_bias",
    "use_qk_norm",
    "norm_type",
    "layer_norm_eps",
    "hidden_act",
    "layer_scale_init_value",
    "use_mean_pooling",
)


def native_settings(config: dict, directory: Path) -> RemoteSettings:
    """Translate a native ``internvl`` / ``internvl_vision`` config with transformers' own config classes.

    Missing keys take those classes' defaults (the native release's code). A vision-only config does not say
    how wide the language model is: ``text_hidden_size`` is then ``None``.

    Raises:
        WeightsError: for another model type, or a projector set-up the backbones do not reproduce.
    """
    from transformers import InternVLConfig, InternVLVisionConfig

    model_type = config.get("model_type")
    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "architectures")}
    if model_type == "internvl":
        full = InternVLConfig(**fields)
        vision, text_hidden = full.vision_config, int(full.text_config.hidden_size)
        if full.downsample_ratio != 0.5 or full.projector_hidden_act != "gelu":
            raise WeightsError(
                f"{directory}: downsample_ratio={full.downsample_ratio}, projector_hidden_act="
                f"{full.projector_hidden_act!r}; only InternVL2.5's pixel shuffle 0.5 and GELU projector are supported."
            )
        if full.vision_feature_select_strategy != "default":
            raise WeightsError(
                f"{directory}: vision_feature_select_strategy={full.vision_feature_select_strategy!r}; only "
                "'default' (the CLS token dropped before the projector) is supported."
            )
        select = int(full.vision_feature_layer)
    elif model_type == "internvl_vision":
        vision, text_hidden, select = InternVLVisionConfig(**fields), None, -1
    else:
        raise WeightsError(
            f"{directory} holds a {model_type!r} checkpoint; expected a native InternVL layout "
            "(model_type 'internvl' or 'internvl_vision')."
        )
    settings = {key: getattr(vision, key) for key in _NATIVE_VISION_KEYS}
    settings["image_size"] = int(vision.image_size[0])
    settings["patch_size"] = int(vision.patch_size[0])
    settings["num_channels"] = int(vision.num_channels)
    settings["text_hidden_size"] = text_hidden
    layer = _projector_layer(select, settings["num_hidden_layers"], directory, "vision_feature_layer")
    return RemoteSettings(settings, layer)


@dataclass
class KeyPlan:
    """Where each native tensor comes from, which checkpoint tensors are skipped, and which matched no rule."""

    sources: dict[str, tuple[str, int, int]]  # native key -> (checkpoint key, chunk index, number of chunks)
    skipped: dict[str, str]  # checkpoint key -> reason
    unmatched: list[str]


def plan_keys(keys: Iterable[str], rules: Sequence[KeyRule] = KEY_RULES) -> KeyPlan:
    """Apply a key map to checkpoint tensor names.

    Raises:
        WeightsError: if a key matches two rules (the map itself would be ambiguous).
    """
    compiled = [(rule, re.compile(rule.pattern)) for rule in rules]
    sources: dict[str, tuple[str, int, int]] = {}
    skipped: dict[str, str] = {}
    unmatched: list[str] = []
    for key in keys:
        hits = [(rule, m) for rule, regex in compiled if (m := regex.fullmatch(key))]
        if not hits:
            unmatched.append(key)
            continue
        if len(hits) > 1:
            raise WeightsError(f"Key map is ambiguous: {key!r} matches {[r.pattern for r, _ in hits]}.")
        rule, match = hits[0]
        if not rule.targets:
            skipped[key] = rule.reason
        for index, template in enumerate(rule.targets):
            sources[match.expand(template)] = (key, index, len(rule.targets))
    return KeyPlan(sources, skipped, sorted(unmatched))


def _listing(keys: Sequence[str], limit: int = 12) -> str:
    return f"{list(keys[:limit])}{f' ... ({len(keys)} in all)' if len(keys) > limit else ''}"


def convert_checkpoint(
    checkpoint: TensorSource,
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    rules: Sequence[KeyRule] = KEY_RULES,
    parts: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Rename (and split) a checkpoint's tensors into the native layout, strictly, reading only what is needed.

    The names are checked first (every checkpoint tensor consumed by a rule, every native tensor filled), then
    the shapes from the file headers; only then are tensors read, and only those of ``parts``.

    Args:
        checkpoint: The opened checkpoint (e.g. :class:`~earthmind_compat.weights.CheckpointFiles` with its
            config).
        expected: Native key -> shape of every tensor the layout fills (the model built on the meta device from
            the checkpoint's config), with the prefixes ``vision_tower.``, ``projector.``, ``gate.``.
        rules: The key map (default :data:`KEY_RULES`, EarthMind's release).
        parts: Native parts to read (``{"vision_tower", "projector"}``...); ``None`` reads all.

    Returns:
        ``{native key: tensor}`` for the native keys of ``parts``; the patch kernel is still the released one.

    Raises:
        WeightsError: listing missing native keys, checkpoint keys no rule consumes, and wrong shapes.
    """
    label = checkpoint.config.get("model_type")
    plan = plan_keys(checkpoint.keys, rules)
    missing = sorted(set(expected) - set(plan.sources))
    surplus = sorted({plan.sources[k][0] for k in set(plan.sources) - set(expected)})
    unexpected = sorted(set(plan.unmatched) | set(surplus))
    if missing or unexpected:
        details = [f"missing {_listing(missing)}"] if missing else []
        details += [f"unexpected {_listing(unexpected)}"] if unexpected else []
        raise WeightsError(
            f"The {label} checkpoint in {checkpoint.directory} does not convert cleanly: {'; '.join(details)}. "
            f"Is it a complete {label} checkpoint whose config matches its tensors?"
        )
    shapes = checkpoint.shapes({source for source, _, _ in plan.sources.values()})
    wrong: list[str] = []
    for native, (source, _, chunks) in plan.sources.items():
        shape = tuple(shapes[source])
        if chunks > 1:
            if not shape or shape[0] % chunks:
                wrong.append(f"{source}: {shape} does not split into {chunks}")
                continue
            shape = (shape[0] // chunks, *shape[1:])
        if shape != tuple(expected[native]):
            wrong.append(f"{source} -> {native}: {shape} vs {tuple(expected[native])}")
    if wrong:
        raise WeightsError(
            f"The {label} checkpoint in {checkpoint.directory} has tensors of another shape than the model built "
            f"from its config.json: {_listing(sorted(wrong), 5)}. config.json does not describe these tensors (a "
            "dimension it leaves out takes the released code's default); fix config.json or pass the directory it "
            "was saved with."
        )
    wanted = {k: v for k, v in plan.sources.items() if parts is None or k.partition(".")[0] in parts}
    tensors = checkpoint.load({source for source, _, _ in wanted.values()})
    out: dict[str, torch.Tensor] = {}
    for native, (source, index, chunks) in wanted.items():
        tensor = tensors[source]
        out[native] = tensor.chunk(chunks, dim=0)[index] if chunks > 1 else tensor
    return out


def split_layout(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group a converted state dict by part: ``{"vision_tower": ..., "projector": ..., "gate": ...}``."""
    parts: dict[str, dict[str, torch.Tensor]] = {
        p.rstrip("."): {} for p in (VISION_PREFIX, PROJECTOR_PREFIX, GATE_PREFIX)
    }
    for key, tensor in state.items():
        part, _, rest = key.partition(".")
        parts[part][rest] = tensor
    return parts
