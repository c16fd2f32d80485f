"""One loader for every InternVL-family layout: checkpoints as their publishers ship them give the same features.

Every fixture is a tiny model built from ``transformers``' real config classes, written in each layout
(``internvl_layouts``; EarthMind's from ``earthmind_reference``), as the releases are: bf16, sharded with a
``model.safetensors.index.json``, inside a hub-cache snapshot reached through ``pretrained=True``. The loader
is never patched: the hub cache is a real ``huggingface_hub`` cache directory, found as ``HF_HUB_CACHE`` says.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from earthmind_reference import TINY_VISION, write_remote_checkpoint
from internvl_layouts import (
    TINY_6B,
    cast_files,
    hub_snapshot,
    native_model,
    use_hub_cache,
    write_intern_vit,
    write_internvl_chat,
    write_native,
    write_native_vision,
)
from terratorch.registry import BACKBONE_REGISTRY

from earthmind_compat import weights
from earthmind_compat.backbones import convert
from earthmind_compat.compat import call_with_hidden_states
from earthmind_compat.errors import WeightsError

pytestmark = pytest.mark.registry
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    """The same tiny models written in every layout (300M-like tower + projector, 6B-like tower, EarthMind)."""
    root = tmp_path_factory.mktemp("layouts")
    model, model_6b = native_model(), native_model(TINY_6B, seed=6)
    return {
        "native": write_native(model, root / "native"),
        "native_sharded": write_native(model, root / "native_sharded", shards=3),
        "native_vision": write_native_vision(model, root / "native_vision"),
        "internvl_chat": write_internvl_chat(model, root / "internvl_chat", shards=2),
        "intern_vit_6b": write_intern_vit(model_6b, root / "intern_vit_6b"),
        "native_vision_6b": write_native_vision(model_6b, root / "native_vision_6b"),
        "sa2va_chat": _earthmind(root / "sa2va_chat", seed=0),
        "sa2va_chat_multi": _earthmind(root / "sa2va_chat_multi", seed=1),
    }


def _earthmind(directory: Path, seed: int) -> Path:
    write_remote_checkpoint(directory, TINY_VISION, seed=seed)
    return directory


def _input(seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def features(name: str, **kwargs) -> list[torch.Tensor]:
    torch.manual_seed(0)
    backbone = BACKBONE_REGISTRY.build(name, **kwargs).eval()
    x = _input()
    if name == "earthmind_v1" and kwargs.get("modalities"):
        x = {key: _input(seed) for seed, key in enumerate(kwargs["modalities"])}
    with torch.no_grad():
        return backbone(x)


def identical(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


# -- every layout gives the features of the same model -----------------------------------------------------

#: (backbone, its arguments, layout, the layout it must equal)
SAME_MODEL = [
    ("internvl2_5_4b", {"preset": "tiny", "with_projector": True}, "internvl_chat", "native"),
    ("internvl2_5_4b", {"preset": "tiny", "with_projector": True}, "native_sharded", "native"),
    ("internvl2_5_4b", {"preset": "tiny"}, "native_vision", "native"),
    ("internvl2_5_4b", {"preset": "internvit_6b"}, "intern_vit_6b", "native_vision_6b"),
    ("earthmind_v1", {"preset": "tiny", "with_projector": True}, "internvl_chat", "native"),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "layout", "reference"), SAME_MODEL, ids=[f"{c[0]}-{c[2]}-vs-{c[3]}" for c in SAME_MODEL]
)
def test_a_model_written_in_another_layout_gives_identical_features(layouts, name, kwargs, layout, reference):
    ours = features(name, weights=str(layouts[layout]), **kwargs)
    assert identical(ours, features(name, weights=str(layouts[reference]), **kwargs))
    if kwargs["preset"] == "tiny":  # (a random internvit_6b would be the full 6B tower)
        assert not identical(ours, features(name, **kwargs)), "the weights must have been loaded"


def test_native_features_are_transformers_own(layouts):
    """The anchor of the comparisons above: the native model's own forward, by transformers."""
    from transformers import InternVLForConditionalGeneration

    reference = InternVLForConditionalGeneration.from_pretrained(str(layouts["native"])).eval()
    ours = features("internvl2_5_4b", preset="tiny", with_projector=True, weights=str(layouts["internvl_chat"]))
    with torch.no_grad():
        hidden = call_with_hidden_states(reference.model.vision_tower, _input()).hidden_states
        projected = reference.model.get_image_features(
            pixel_values=_input(), vision_feature_layer=-1, vision_feature_select_strategy="default"
        )
    projected = getattr(projected, "pooler_output", projected)
    assert (ours[-1] - projected).abs().max() <= 1e-5
    for feature, state in zip(ours[:-1], hidden[1:], strict=True):
        assert (feature - state).abs().max() <= 1e-5


# -- the default hub ids, through a real hub cache ------------------------------------------------------------

#: (case, backbone arguments reaching the hub, the local layout they must equal)
HUB_CASES = [
    ("internvl2_5_4b", {"preset": "tiny", "pretrained": True, "with_projector": True}, "internvl_chat"),
    ("internvl2_5_4b", {"preset": "internvit_6b", "pretrained": True}, "intern_vit_6b"),
    ("earthmind_v1", {"preset": "tiny", "pretrained": True, "with_projector": True}, "sa2va_chat"),
    (
        "earthmind_v1",
        {"preset": "tiny", "pretrained": True, "release": "EarthMind4B_multi", "with_projector": True},
        "sa2va_chat_multi",
    ),
    ("internvl2_5_4b", {"preset": "tiny", "weights": "tiny-org/internvl-hf", "with_projector": True}, "native_sharded"),
    ("internvl2_5_4b", {"preset": "tiny", "weights": "tiny-org/internvit-hf"}, "native_vision"),
]
HUB_IDS = {
    "internvl_chat": "OpenGVLab/InternVL2_5-4B",
    "intern_vit_6b": "OpenGVLab/InternViT-6B-448px-V2_5",
    "sa2va_chat": "sy1998/EarthMind-4B",
    "sa2va_chat_multi": "sy1998/EarthMind4B_multi",
    "native_sharded": "tiny-org/internvl-hf",
    "native_vision": "tiny-org/internvit-hf",
}


def test_pretrained_loads_the_default_releases_from_the_hub_cache(layouts, tmp_path, monkeypatch):
    cache = tmp_path / "hf_home" / "hub"
    for layout, repo_id in HUB_IDS.items():
        hub_snapshot(cache, repo_id, layouts[layout])
    use_hub_cache(monkeypatch, cache)
    assert weights.hub_offline(), "the suite runs offline (conftest): only the cache can answer"
    from_hub = []
    for name, kwargs, layout in HUB_CASES:
        hub_features = features(name, **kwargs)
        local = {k: v for k, v in kwargs.items() if k not in ("pretrained", "release", "weights")}
        assert identical(hub_features, features(name, weights=str(layouts[layout]), **local)), (name, kwargs)
        from_hub.append(hub_features)
    assert not identical(from_hub[2], from_hub[3]), "release= picks another checkpoint"


# -- checkpoints as published: bf16, shards ------------------------------------------------------------------

BF16_CASES = [
    ("internvl2_5_4b", {"preset": "tiny", "with_projector": True}, "native"),
    ("internvl2_5_4b", {"preset": "tiny", "with_projector": True}, "internvl_chat"),
    ("internvl2_5_4b", {"preset": "internvit_6b"}, "intern_vit_6b"),
    ("earthmind_v1", {"preset": "tiny", "with_projector": True, "modalities": {"sar": 3, "optical": 3}}, "sa2va_chat"),
]


@pytest.mark.numerics
@pytest.mark.parametrize(("name", "kwargs", "layout"), BF16_CASES, ids=[f"{c[0]}-{c[2]}" for c in BF16_CASES])
def test_a_bf16_checkpoint_loads_as_the_fp32_load_of_the_same_tensors(layouts, tmp_path, name, kwargs, layout):
    """The releases are bf16: read and upcast, they must give exactly what the same values stored in fp32 give."""
    half, full = tmp_path / "bf16", tmp_path / "fp32"
    shutil.copytree(layouts[layout], half)
    cast_files(half, torch.bfloat16)
    shutil.copytree(half, full)
    cast_files(full, torch.float32)  # the bf16 values, stored in fp32
    stored = weights.CheckpointFiles(half)
    assert {stored.load([k])[k].dtype for k in stored.keys[:5]} == {torch.bfloat16}
    ours = features(name, weights=str(half), **kwargs)
    assert all(f.dtype == torch.float32 for f in ours)
    assert identical(ours, features(name, weights=str(full), **kwargs))
    assert not identical(ours, features(name, weights=str(layouts[layout]), **kwargs)), "bf16 rounds the weights"


def test_only_the_needed_tensors_and_shards_are_read(layouts, monkeypatch):
    opened: list[str] = []
    real = weights.open_safetensors

    def spy(path):
        opened.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(weights, "open_safetensors", spy)
    read: list[str] = []
    real_load = weights.CheckpointFiles.load
    monkeypatch.setattr(weights.CheckpointFiles, "load", lambda self, keys: read.extend(keys) or real_load(self, keys))
    features("internvl2_5_4b", preset="tiny", weights=str(layouts["internvl_chat"]))
    assert read and all(key.startswith("vision_model.") for key in read), "no projector, no language model read"
    index = json.loads((layouts["internvl_chat"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(opened) == {index[key] for key in read}, "only the shards holding those tensors are opened"


@pytest.mark.reliability
def test_a_missing_shard_is_named_before_anything_is_read(layouts, tmp_path):
    directory = tmp_path / "partial"
    shutil.copytree(layouts["internvl_chat"], directory)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"lists 2 shards but \['model-00002-of-00002.safetensors'\] is not there"):
        features("internvl2_5_4b", preset="tiny", weights=str(directory))


@pytest.mark.reliability
def test_a_projector_the_checkpoint_lacks_is_refused_by_name(layouts):
    with pytest.raises(WeightsError, match=r"holds no projector \(mlp1\).*with_projector=False"):
        features("internvl2_5_4b", preset="tiny", weights=str(layouts["native_vision"]), with_projector=True)


# -- weights= with quantization= ----------------------------------------------------------------------------


def _layer_cosines(first: list[torch.Tensor], second: list[torch.Tensor]) -> list[float]:
    pairs = zip(first, second, strict=True)
    return [torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0).item() for a, b in pairs]


#: Worst per-layer cosine to the fp32 load of the same tensors (measured on this tiny checkpoint: see the report).
QUANTIZED_FLOOR = {"int8": 0.999, "nf4": 0.98}


@pytest.mark.numerics
@pytest.mark.parametrize("quantization", sorted(QUANTIZED_FLOOR))
@pytest.mark.parametrize("layout", ["internvl_chat", "native"])
def test_quantized_weights_follow_the_fp32_load_of_the_same_tensors(layouts, layout, quantization):
    kwargs = {"preset": "tiny", "with_projector": True, "out_indices": [0, 1, 2, 3]}
    full = features("internvl2_5_4b", weights=str(layouts[layout]), **kwargs)
    quantized = features("internvl2_5_4b", weights=str(layouts[layout]), quantization=quantization, **kwargs)
    cosines = _layer_cosines(quantized, full)
    assert min(cosines) >= QUANTIZED_FLOOR[quantization], cosines
    assert not identical(quantized, full), "the layers must really be quantized"
    unloaded = features("internvl2_5_4b", quantization=quantization, **kwargs)  # same technique, no weights
    assert max(_layer_cosines(unloaded, full)) < 0.5, "without the weights the features are another model's"


# -- transformers' own rename table for the original InternVL layout --------------------------------------------


def _transformers_internvit_table():
    """transformers' rename table for InternVL's remote layout (``mlp1``, fused ``attn.qkv``), if it ships one."""
    try:
        from transformers import conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return None
    for name, transforms in conversion_mapping._build_checkpoint_conversion_mapping().items():
        sources = [p for t in transforms for p in t.source_patterns]
        if all(any(marker in p for p in sources) for marker in ("mlp1", "attn.qkv", "vision_model")):
            renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
            converters = [t for t in transforms if isinstance(t, WeightConverter)]
            return name, renamings, converters, rename_source_key
    return None


TABLE = _transformers_internvit_table()


@pytest.mark.skipif(
    TABLE is None,
    reason="this transformers ships no rename table for InternVL's remote layout (conversion_mapping.py with "
    "'mlp1' and 'attn.qkv' rules exists from 5.x)",
)
def test_our_key_map_agrees_with_transformers_rename_table_key_by_key(layouts):
    """transformers 5.x renames the remote InternViT names for Qianfan-OCR, whose tower is InternVL's.

    Its model stores the layers as ``vision_tower.layers.N`` where ``InternVLVisionModel`` has
    ``vision_tower.encoder.layer.N``, and the projector as ``model.multi_modal_projector``: the test checks that
    this is the only difference between the two towers' state dicts, then compares every key of a real
    remote-layout checkpoint (the fused qkv split in transformers' chunk order).
    """
    from transformers.models.qianfan_ocr.modeling_qianfan_ocr import QianfanOCRVisionModel

    name, renamings, converters, rename = TABLE
    from transformers import InternVLVisionModel

    from earthmind_compat.backbones.internvl import INTERNVL_PRESETS, vision_config_from_preset

    vision_config = vision_config_from_preset(INTERNVL_PRESETS["tiny"], 3, None)
    with torch.device("meta"):
        theirs_keys = set(QianfanOCRVisionModel(_qianfan_vision_config(vision_config)).state_dict())
        ours_keys = set(InternVLVisionModel(vision_config).state_dict())
    assert {k.replace("layers.", "encoder.layer.", 1) for k in theirs_keys} == ours_keys

    def to_ours(key: str) -> str:
        key = key.replace("model.vision_tower.layers.", "vision_tower.encoder.layer.")
        key = key.replace("model.vision_tower.", "vision_tower.")
        return key.replace("model.multi_modal_projector.", "projector.")

    checkpoint = weights.CheckpointFiles(layouts["internvl_chat"])
    plan = convert.plan_keys(checkpoint.keys, convert.INTERNVL_CHAT_RULES)
    ours_by_source: dict[str, list[tuple[int, str]]] = {}
    for native, (source, index, _) in plan.sources.items():
        ours_by_source.setdefault(source, []).append((index, native))
    compared = 0
    for source in sorted(ours_by_source):
        renamed, pattern = rename(source, renamings, converters)
        if pattern is None:
            targets = [renamed]
        else:  # a converter: the key carries its first target; Chunk(dim=0) fills the targets in order
            converter = next(c for c in converters if pattern in c.source_patterns)
            first = converter.target_patterns[0]
            targets = [renamed.replace(first, target) for target in converter.target_patterns]
        expected = [to_ours(t) for t in targets]
        assert [native for _, native in sorted(ours_by_source[source])] == expected, (name, source)
        compared += 1
    assert compared == len(ours_by_source) == len(checkpoint.keys) - len(plan.skipped)
    assert any(len(v) == 3 for v in ours_by_source.values()), "the fused qkv was compared"


def _qianfan_vision_config(vision_config):
    from transformers.models.qianfan_ocr.configuration_qianfan_ocr import QianfanOCRVisionConfig

    fields = {k: getattr(vision_config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")}
    fields.update(intermediate_size=vision_config.intermediate_size, image_size=56, patch_size=14)
    return QianfanOCRVisionConfig(**fields)


# -- config defaults: a key the remote config leaves out takes the released code's default ------------------------


def _remote_without(layouts, tmp_path, layout: str, key: str, section: str | None = "vision_config") -> Path:
    directory = tmp_path / f"{layout}-without-{key}"
    shutil.copytree(layouts[layout], directory)
    config = json.loads((directory / "config.json").read_text())
    (config[section] if section else config).pop(key)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


#: (key left out, layout, what the released default does with these tensors)
DEFAULTS = [
    ("qkv_bias", "internvl_chat", r"unexpected \[.*attn\.qkv\.bias"),  # default False: the bias tensors are extra
    ("qk_normalization", "internvl_chat", r"missing \[.*attention\.k_norm\.weight"),  # default True
    ("norm_type", "internvl_chat", r"unexpected \[.*norm1\.bias"),  # default rms_norm: no bias
    ("image_size", "internvl_chat", r"position_embedding -> .*\(1, 17, 32\) vs \(1, 257, 32\)"),  # default 224
    ("hidden_size", "intern_vit_6b", r"vs \(3200,\)"),  # default 3200 (InternViT-6B)
]


@pytest.mark.reliability
@pytest.mark.parametrize(("key", "layout", "message"), DEFAULTS, ids=[c[0] for c in DEFAULTS])
def test_a_vision_key_left_out_takes_the_released_default(layouts, tmp_path, key, layout, message):
    section = None if layout == "intern_vit_6b" else "vision_config"
    directory = _remote_without(layouts, tmp_path, layout, key, section)
    preset = "internvit_6b" if layout == "intern_vit_6b" else "tiny"
    with pytest.raises(WeightsError, match=message):
        features("internvl2_5_4b", preset=preset, weights=str(directory))


@pytest.mark.parametrize(
    ("key", "layout", "checks"),
    [
        ("layer_norm_eps", "internvl_chat", lambda b: b.vision_config.layer_norm_eps == 1e-6),
        ("hidden_act", "internvl_chat", lambda b: b.vision_config.hidden_act == "gelu"),
        ("patch_size", "internvl_chat", lambda b: b.patch_size == 14),
        ("num_channels", "internvl_chat", lambda b: b.model.embeddings.patch_embeddings.num_channels == 3),
        ("qkv_bias", "intern_vit_6b", lambda b: b.vision_config.attention_bias is False),
        ("qk_normalization", "intern_vit_6b", lambda b: b.vision_config.use_qk_norm is True),
        ("norm_type", "intern_vit_6b", lambda b: b.vision_config.norm_type == "rms_norm"),
    ],
)
def test_a_default_that_fits_the_tensors_loads(layouts, tmp_path, key, layout, checks):
    section = None if layout == "intern_vit_6b" else "vision_config"
    directory = _remote_without(layouts, tmp_path, layout, key, section)
    preset = "internvit_6b" if layout == "intern_vit_6b" else "tiny"
    backbone = BACKBONE_REGISTRY.build("internvl2_5_4b", preset=preset, weights=str(directory))
    assert checks(backbone)
    assert identical(
        features("internvl2_5_4b", preset=preset, weights=str(directory)),
        features("internvl2_5_4b", preset=preset, weights=str(layouts[layout])),
    )


def test_the_stated_layer_norm_eps_is_used_not_a_default(layouts, tmp_path):
    directory = tmp_path / "eps"
    shutil.copytree(layouts["internvl_chat"], directory)
    config = json.loads((directory / "config.json").read_text())
    config["vision_config"]["layer_norm_eps"] = 1e-2
    (directory / "config.json").write_text(json.dumps(config))
    backbone = BACKBONE_REGISTRY.build("internvl2_5_4b", preset="tiny", weights=str(directory))
    assert backbone.model.encoder.layer[0].layernorm_before.eps == 1e-2


@pytest.mark.parametrize(
    ("key", "message_or_layer"),
    [
        ("ps_version", "leaves it out; the released config class defaults to 'v1'"),
        ("select_layer", 3),  # default -1: the last of the 4 layers feeds the projector
        ("downsample_ratio", 3),  # default 0.5
    ],
)
def test_a_chat_key_left_out_takes_the_released_default(layouts, tmp_path, key, message_or_layer):
    directory = _remote_without(layouts, tmp_path, "internvl_chat", key, None)
    if isinstance(message_or_layer, str):
        with pytest.raises(WeightsError, match=message_or_layer):
            BACKBONE_REGISTRY.build("internvl2_5_4b", preset="tiny", weights=str(directory), with_projector=True)
        return
    backbone = BACKBONE_REGISTRY.build("internvl2_5_4b", preset="tiny", weights=str(directory), with_projector=True)
    assert backbone.projector_layer == message_or_layer


@pytest.mark.reliability
def test_a_language_model_width_left_out_is_refused(layouts, tmp_path):
    directory = _remote_without(layouts, tmp_path, "internvl_chat", "hidden_size", "llm_config")
    with pytest.raises(WeightsError, match="has no 'hidden_size'; it is not a complete llm_config config"):
        features("internvl2_5_4b", preset="tiny", weights=str(directory))


@pytest.mark.reliability
def test_an_unknown_earthmind_release_names_the_releases():
    from earthmind_compat.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match=r"Did you mean 'EarthMind4B_multi'.*EarthMind-4B"):
        BACKBONE_REGISTRY.build("earthmind_v1", preset="tiny", pretrained=True, release="EarthMind4B-multi")
