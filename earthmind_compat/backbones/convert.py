"""Convert EarthMind's released checkpoint (remote-code Sa2VA / InternVL layout) to the native classes.

EarthMind-4B is published in the key layout of its remote code (``model_type`` ``sa2va_chat``): an
``InternVisionModel`` under ``vision_model.`` with a fused ``qkv`` projection, the projector as the
``nn.Sequential`` ``mlp1``, the gating queries ``local_query``, then the language model, the SAM2 grounding
encoder and ``text_hidden_fcs``. Nothing of that code is run here: ``config.json`` is read as data and the
tensors are renamed by :data:`KEY_RULES` into the names of ``transformers``' native ``InternVLVisionModel``
and ``InternVLMultiModalProjector`` and of our :class:`~earthmind_compat.backbones.fusion.CrossModalGate`.

The map is strict: every tensor of the checkpoint must match exactly one rule (a rename, or a skip with a
stated reason), and every native parameter must be filled with a tensor of the right shape; otherwise
:class:`~earthmind_compat.errors.WeightsError` lists the missing and unexpected keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import InternVLVisionModel
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

from earthmind_compat.backbones.fusion import CrossModalGate
from earthmind_compat.backbones.internvl import projector_config, vision_config_from_preset
from earthmind_compat.errors import WeightsError
from earthmind_compat.weights import checkpoint_keys, load_tensors, open_safetensors, read_config, safetensors_files

#: ``model_type`` values of EarthMind's released (remote-code) configs.
REMOTE_MODEL_TYPES = ("sa2va_chat",)

#: Prefixes of the native layout produced by :func:`convert_checkpoint`.
VISION_PREFIX, PROJECTOR_PREFIX, GATE_PREFIX = "vision_tower.", "projector.", "gate."


@dataclass(frozen=True)
class KeyRule:
    """One entry of the key map.

    Attributes:
        pattern: Regular expression that must match a whole remote key.
        targets: Native key templates (``re`` replacement syntax). Several targets split the tensor into that
            many equal chunks along dimension 0 (the fused ``qkv``). Empty: the tensor is deliberately unused.
        reason: Why a skipped tensor is not part of the backbone.
    """

    pattern: str
    targets: tuple[str, ...] = ()
    reason: str = ""


_REMOTE_LAYER = r"vision_model\.encoder\.layers\.(\d+)\."
_NATIVE_LAYER = VISION_PREFIX + r"encoder.layer.\1."

#: Remote-code name -> native name, one rule per tensor family.
KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule(r"vision_model\.embeddings\.class_embedding", (VISION_PREFIX + "embeddings.cls_token",)),
    KeyRule(
        r"vision_model\.embeddings\.patch_embedding\.(weight|bias)",
        (VISION_PREFIX + r"embeddings.patch_embeddings.projection.\1",),
    ),
    KeyRule(r"vision_model\.embeddings\.position_embedding", (VISION_PREFIX + "embeddings.position_embeddings",)),
    KeyRule(
        _REMOTE_LAYER + r"attn\.qkv\.(weight|bias)",
        tuple(_NATIVE_LAYER + f"attention.{p}_proj." + r"\2" for p in "qkv"),
    ),
    KeyRule(_REMOTE_LAYER + r"attn\.proj\.(weight|bias)", (_NATIVE_LAYER + r"attention.projection_layer.\2",)),
    KeyRule(_REMOTE_LAYER + r"attn\.q_norm\.weight", (_NATIVE_LAYER + "attention.q_norm.weight",)),
    KeyRule(_REMOTE_LAYER + r"attn\.k_norm\.weight", (_NATIVE_LAYER + "attention.k_norm.weight",)),
    KeyRule(_REMOTE_LAYER + r"mlp\.(fc1|fc2)\.(weight|bias)", (_NATIVE_LAYER + r"mlp.\2.\3",)),
    KeyRule(_REMOTE_LAYER + r"norm1\.(weight|bias)", (_NATIVE_LAYER + r"layernorm_before.\2",)),
    KeyRule(_REMOTE_LAYER + r"norm2\.(weight|bias)", (_NATIVE_LAYER + r"layernorm_after.\2",)),
    KeyRule(_REMOTE_LAYER + r"ls1", (_NATIVE_LAYER + "lambda_1",)),
    KeyRule(_REMOTE_LAYER + r"ls2", (_NATIVE_LAYER + "lambda_2",)),
    KeyRule(r"mlp1\.0\.(weight|bias)", (PROJECTOR_PREFIX + r"layer_norm.\1",)),
    KeyRule(r"mlp1\.1\.(weight|bias)", (PROJECTOR_PREFIX + r"linear_1.\1",)),
    KeyRule(r"mlp1\.3\.(weight|bias)", (PROJECTOR_PREFIX + r"linear_2.\1",)),
    KeyRule(r"local_query", (GATE_PREFIX + "local_query",)),
    KeyRule(r"language_model\..+", reason="the Qwen2.5 language model reads the image tokens; not an image backbone"),
    KeyRule(r"grounding_encoder\..+", reason="the SAM2 grounding encoder decodes masks from [SEG] tokens"),
    KeyRule(r"text_hidden_fcs\..+", reason="maps the language model's [SEG] states to SAM2 prompts"),
)


@dataclass(frozen=True)
class RemoteSettings:
    """What a remote config says about the parts we build.

    Attributes:
        vision: Preset-style settings for :func:`~earthmind_compat.backbones.internvl.vision_config_from_preset`
            (including ``text_hidden_size``, the projector's output width).
        projector_layer: Index of the vision layer whose output feeds the projector (``select_layer``).
    """

    vision: dict
    projector_layer: int


def is_remote_config(config: dict) -> bool:
    """Whether a ``config.json`` is in EarthMind's released remote-code format."""
    return config.get("model_type") in REMOTE_MODEL_TYPES


def _not_remote(config: dict, directory: Path) -> WeightsError:
    return WeightsError(
        f"{directory} holds a {config.get('model_type')!r} checkpoint; expected EarthMind's released format "
        f"(model_type {' or '.join(map(repr, REMOTE_MODEL_TYPES))}). For a native InternVL checkpoint use the "
        "internvl2_5_4b backbone."
    )


def _require(config: dict, key: str, directory: Path) -> object:
    if key not in config:
        raise WeightsError(
            f"{directory}/config.json has no {key!r}; it is not a complete EarthMind (sa2va_chat) config."
        )
    return config[key]


def remote_settings(config: dict, directory: Path) -> RemoteSettings:
    """Translate a remote ``sa2va_chat`` config into native settings.

    The remote names ``qkv_bias`` / ``qk_normalization`` become ``attention_bias`` / ``use_qk_norm`` (the native
    config would silently ignore the remote names).

    Raises:
        WeightsError: if the config is incomplete or asks for something the native classes do not do.
    """
    if not is_remote_config(config):
        raise _not_remote(config, directory)
    vision = _require(config, "vision_config", directory)
    llm = _require(config, "llm_config", directory)
    ratio = config.get("downsample_ratio", 0.5)
    if ratio != 0.5:
        raise WeightsError(f"{directory}: downsample_ratio={ratio}; only InternVL's pixel shuffle 0.5 is supported.")
    if config.get("ps_version", "v2") != "v2":
        raise WeightsError(
            f"{directory}: ps_version={config.get('ps_version')!r} (the transposed pixel shuffle); "
            "only 'v2' is supported."
        )
    settings = {
        "hidden_size": int(_require(vision, "hidden_size", directory)),
        "num_hidden_layers": int(_require(vision, "num_hidden_layers", directory)),
        "num_attention_heads": int(_require(vision, "num_attention_heads", directory)),
        "intermediate_size": int(_require(vision, "intermediate_size", directory)),
        "image_size": int(_require(vision, "image_size", directory)),
        "patch_size": int(_require(vision, "patch_size", directory)),
        "attention_bias": bool(vision.get("qkv_bias", True)),
        "use_qk_norm": bool(vision.get("qk_normalization", False)),
        "norm_type": vision.get("norm_type", "layer_norm"),
        "layer_norm_eps": float(vision.get("layer_norm_eps", 1e-6)),
        "hidden_act": vision.get("hidden_act", "gelu"),
        "use_mean_pooling": True,  # the remote tower has no final norm
        "text_hidden_size": int(_require(llm, "hidden_size", directory)),
    }
    if settings["norm_type"] not in ("layer_norm", "rms_norm"):
        raise WeightsError(f"{directory}: unknown vision norm_type {settings['norm_type']!r}.")
    layers = settings["num_hidden_layers"]
    select = int(config.get("select_layer", -1))
    if not -(layers + 1) <= select <= layers:
        raise WeightsError(f"{directory}: select_layer={select} is outside the {layers} vision layers.")
    projector_layer = select % (layers + 1) - 1  # remote hidden_states[0] is the patch embedding
    if projector_layer < 0:
        raise WeightsError(f"{directory}: select_layer={select} projects the patch embeddings, which is not supported.")
    return RemoteSettings(settings, projector_layer)


@dataclass
class RemoteCheckpoint:
    """A checkpoint directory in the remote layout: its config, tensor names and a reader for chosen tensors."""

    directory: Path
    config: dict
    keys: list[str]
    allow_pickle: bool = False

    def load(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read only ``keys`` (safetensors are opened lazily, so the language model is never loaded)."""
        wanted = set(keys)
        out: dict[str, torch.Tensor] = {}
        files = safetensors_files(self.directory, allow_pickle=self.allow_pickle)
        if all(p.suffix == ".safetensors" for p in files):
            for path in files:
                with open_safetensors(path) as handle:
                    for key in wanted.intersection(handle.keys()):
                        out[key] = handle.get_tensor(key)
        else:
            out = {k: v for k, v in load_tensors(self.directory, ("",), self.allow_pickle).items() if k in wanted}
        return out


def open_remote_checkpoint(directory: Path, allow_pickle: bool = False) -> RemoteCheckpoint:
    """Read the config and the tensor names of a remote-layout checkpoint (no tensor is loaded).

    Raises:
        WeightsError: if the directory is not an EarthMind release checkpoint.
    """
    config = read_config(directory)
    if not is_remote_config(config):
        raise _not_remote(config, directory)
    return RemoteCheckpoint(directory, config, checkpoint_keys(directory, allow_pickle), allow_pickle)


@dataclass
class KeyPlan:
    """Where each native tensor comes from, which remote tensors are skipped, and which matched no rule."""

    sources: dict[str, tuple[str, int, int]]  # native key -> (remote key, chunk index, number of chunks)
    skipped: dict[str, str]  # remote key -> reason
    unmatched: list[str]


def plan_keys(keys: Iterable[str], rules: Sequence[KeyRule] = KEY_RULES) -> KeyPlan:
    """Apply the key map to remote tensor names.

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


def native_shapes(settings: RemoteSettings) -> dict[str, torch.Size]:
    """Names and shapes of every native tensor the checkpoint must fill (built on the meta device)."""
    vision_config = vision_config_from_preset(settings.vision, 3, None)
    with torch.device("meta"):
        parts = {
            VISION_PREFIX: InternVLVisionModel(vision_config),
            PROJECTOR_PREFIX: InternVLMultiModalProjector(
                projector_config(vision_config, settings.vision["text_hidden_size"])
            ),
            GATE_PREFIX: CrossModalGate(settings.vision["text_hidden_size"]),
        }
    return {prefix + k: v.shape for prefix, module in parts.items() for k, v in module.state_dict().items()}


def _listing(keys: Sequence[str], limit: int = 12) -> str:
    return f"{list(keys[:limit])}{f' ... ({len(keys)} in all)' if len(keys) > limit else ''}"


def convert_checkpoint(
    checkpoint: RemoteCheckpoint, settings: RemoteSettings, rules: Sequence[KeyRule] = KEY_RULES
) -> dict[str, torch.Tensor]:
    """Rename (and split) the remote tensors into the native layout, strictly.

    Args:
        checkpoint: The opened remote checkpoint.
        settings: Its translated config (:func:`remote_settings`).
        rules: The key map (default :data:`KEY_RULES`).

    Returns:
        ``{native key: tensor}`` with the prefixes ``vision_tower.``, ``projector.`` and ``gate.``; the patch
        kernel is still the released 3-channel one.

    Raises:
        WeightsError: listing missing native keys, remote keys no rule consumes, and wrong shapes.
    """
    plan = plan_keys(checkpoint.keys, rules)
    expected = native_shapes(settings)
    missing = sorted(set(expected) - set(plan.sources))
    surplus = sorted({plan.sources[k][0] for k in set(plan.sources) - set(expected)})
    unexpected = sorted(set(plan.unmatched) | set(surplus))
    if missing or unexpected:
        details = [f"missing {_listing(missing)}"] if missing else []
        details += [f"unexpected {_listing(unexpected)}"] if unexpected else []
        raise WeightsError(
            f"The EarthMind checkpoint in {checkpoint.directory} does not convert cleanly: {'; '.join(details)}. "
            "Is it a complete sa2va_chat checkpoint whose config matches its tensors?"
        )
    tensors = checkpoint.load({remote for remote, _, _ in plan.sources.values()})
    out: dict[str, torch.Tensor] = {}
    wrong: list[str] = []
    for native, (remote, index, parts) in plan.sources.items():
        tensor = tensors[remote]
        if parts > 1:
            if tensor.shape[0] % parts:
                wrong.append(f"{remote}: {tuple(tensor.shape)} does not split into {parts}")
                continue
            tensor = tensor.chunk(parts, dim=0)[index]
        if tensor.shape != expected[native]:
            wrong.append(f"{remote} -> {native}: {tuple(tensor.shape)} vs {tuple(expected[native])}")
            continue
        out[native] = tensor
    if wrong:
        raise WeightsError(
            f"The EarthMind checkpoint in {checkpoint.directory} has tensors of the wrong shape for its config: "
            f"{_listing(sorted(wrong), 5)}."
        )
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
