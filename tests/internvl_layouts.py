"""Tiny InternVL-family checkpoints in every layout their publishers ship, written from the real config classes.

Every fixture starts from a model built by ``transformers``' own native classes (``InternVLForConditionalGeneration``,
``InternVLVisionModel``) and seeded random weights; the remote layouts are that same model's tensors written under
the names InternVL's remote code gives them (fused ``qkv``, ``norm1``, ``ls1``, ``mlp1``...), with a config in the
remote classes' key names. The rename below is this test's own statement of the layout, written from the remote
code's module names, independent of ``earthmind_compat.backbones.convert``. No remote code is imported or run.

Layouts: ``native`` (``save_pretrained`` of the whole model), ``native_vision`` (the tower alone),
``internvl_chat`` (InternVL2.5's release), ``intern_vit_6b`` (the standalone InternViT release, 6B-like tower:
RMS norm, qk normalisation, no qkv bias). EarthMind's ``sa2va_chat`` comes from ``earthmind_reference``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from earthmind_compat.backbones.internvl import INTERNVL_PRESETS, vision_config_from_preset

#: The tiny 300M-like tower (the ``tiny`` preset) and a tiny 6B-like one.
TINY_300M = dict(INTERNVL_PRESETS["tiny"])
TINY_6B = {**TINY_300M, "attention_bias": False, "use_qk_norm": True, "norm_type": "rms_norm"}
TEXT_HIDDEN = 64


def native_model(vision: dict = TINY_300M, seed: int = 5, text_layers: int = 1):
    """A tiny ``InternVLForConditionalGeneration`` from the real config classes, every tensor random."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config

    torch.manual_seed(seed)
    text = Qwen2Config(
        hidden_size=TEXT_HIDDEN,
        num_hidden_layers=text_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=64,
    )
    config = InternVLConfig(
        vision_config=vision_config_from_preset(vision, 3, None).to_dict(),
        text_config=text.to_dict(),
        image_token_id=5,
    )
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # zero / one initialised tensors (CLS, positions, norms, layer scale) made random too
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3 + (1.0 if parameter.ndim == 1 else 0.0))
    return model


def _remote_tower_names(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A native ``InternVLVisionModel`` state dict under the remote ``InternVisionModel``'s names."""
    out: dict[str, torch.Tensor] = {}
    layers = {int(key.split(".")[2]) for key in state if key.startswith("encoder.layer.")}
    out[prefix + "embeddings.class_embedding"] = state["embeddings.cls_token"]
    out[prefix + "embeddings.position_embedding"] = state["embeddings.position_embeddings"]
    for kind in ("weight", "bias"):
        out[prefix + f"embeddings.patch_embedding.{kind}"] = state[f"embeddings.patch_embeddings.projection.{kind}"]
    for n in sorted(layers):
        native, remote = f"encoder.layer.{n}.", f"{prefix}encoder.layers.{n}."
        for kind in ("weight", "bias"):
            qkv = [state.get(native + f"attention.{p}_proj.{kind}") for p in "qkv"]
            if qkv[0] is not None:
                out[remote + f"attn.qkv.{kind}"] = torch.cat(qkv, dim=0)  # the remote order: q, then k, then v
            out[remote + f"attn.proj.{kind}"] = state[native + f"attention.projection_layer.{kind}"]
            out[remote + f"mlp.fc1.{kind}"] = state[native + f"mlp.fc1.{kind}"]
            out[remote + f"mlp.fc2.{kind}"] = state[native + f"mlp.fc2.{kind}"]
            for ours, theirs in (("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
                if native + f"{ours}.{kind}" in state:
                    out[remote + f"{theirs}.{kind}"] = state[native + f"{ours}.{kind}"]
        for norm in ("q_norm", "k_norm"):
            if native + f"attention.{norm}.weight" in state:
                out[remote + f"attn.{norm}.weight"] = state[native + f"attention.{norm}.weight"]
        out[remote + "ls1"] = state[native + "lambda_1"]
        out[remote + "ls2"] = state[native + "lambda_2"]
    return out


def remote_vision_config(vision: dict) -> dict:
    """A preset's tower in the remote ``InternVisionConfig``'s key names (every key stated, as releases do)."""
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "num_channels": 3,
        "patch_size": vision["patch_size"],
        "image_size": vision["image_size"],
        "qkv_bias": vision["attention_bias"],
        "hidden_size": vision["hidden_size"],
        "num_attention_heads": vision["num_attention_heads"],
        "intermediate_size": vision["intermediate_size"],
        "qk_normalization": vision["use_qk_norm"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "use_flash_attn": False,
        "hidden_act": "gelu",
        "norm_type": vision["norm_type"],
        "layer_norm_eps": 1e-6,
        "drop_path_rate": 0.0,
    }


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def _save_shards(tensors: dict[str, torch.Tensor], directory: Path, shards: int) -> None:
    """Save ``tensors`` as ``shards`` safetensors files and a ``model.safetensors.index.json`` (or one file)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().contiguous().clone() for key, value in tensors.items()}
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(tensors)
    weight_map = {}
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {key: tensors[key] for key in keys[index::shards]}
        save_file(chunk, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())}}
    (directory / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))


def write_internvl_chat(model, directory: Path, vision: dict = TINY_300M, shards: int = 2) -> Path:
    """``model`` in InternVL2.5's released layout (``internvl_chat``), sharded with an index by default."""
    state = model.state_dict()
    tensors = _remote_tower_names(_sub(state, "model.vision_tower."), "vision_model.")
    for ours, theirs in (("layer_norm", "0"), ("linear_1", "1"), ("linear_2", "3")):
        for kind in ("weight", "bias"):
            tensors[f"mlp1.{theirs}.{kind}"] = state[f"model.multi_modal_projector.{ours}.{kind}"]
    tensors.update({f"language_model.model.{k}": v for k, v in _sub(state, "model.language_model.").items()})
    tensors["language_model.lm_head.weight"] = state["lm_head.weight"]
    _save_shards(tensors, directory, shards)
    text = model.config.text_config.to_dict()
    config = {
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},  # read past, never run
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": vision["image_size"],
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internvl2_5",
        "use_thumbnail": True,
        "vision_config": remote_vision_config(vision),
        "llm_config": {**text, "architectures": ["Qwen2ForCausalLM"]},
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def write_intern_vit(model, directory: Path, vision: dict = TINY_6B, shards: int = 1) -> Path:
    """The tower of ``model`` as the standalone InternViT release (``intern_vit_6b``): unprefixed remote names."""
    tensors = _remote_tower_names(_sub(model.state_dict(), "model.vision_tower."), "")
    _save_shards(tensors, directory, shards)
    config = {**remote_vision_config(vision), "auto_map": {"AutoModel": "modeling_intern_vit.InternVisionModel"}}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def write_native(model, directory: Path, shards: int = 1) -> Path:
    """``save_pretrained`` of the whole native model (sharded by transformers itself when ``shards`` > 1)."""
    if shards == 1:
        model.save_pretrained(directory)
    else:
        total = sum(v.numel() * v.element_size() for v in model.state_dict().values())
        model.save_pretrained(directory, max_shard_size=f"{max(1, total // shards // 1000)}KB")
    return directory


def write_native_vision(model, directory: Path) -> Path:
    """``save_pretrained`` of the native vision tower alone."""
    model.model.vision_tower.save_pretrained(directory)
    return directory


def cast_files(directory: Path, dtype: torch.dtype) -> None:
    """Store every floating tensor of a checkpoint directory in ``dtype`` (the releases are bf16)."""
    from safetensors.torch import load_file

    for path in directory.glob("*.safetensors"):
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path), metadata={"format": "pt"})


def hub_snapshot(cache: Path, repo_id: str, source: Path, revision: str = "0" * 40) -> Path:
    """Lay ``source`` out as ``huggingface_hub``'s cache holds a downloaded repository (``refs/main`` -> snapshot)."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(source, repo / "snapshots" / revision)
    return repo / "snapshots" / revision


def use_hub_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """Point this process at ``cache`` as ``HF_HUB_CACHE=cache`` set before start-up would.

    ``huggingface_hub`` reads the variable once, at import, into ``constants.HF_HUB_CACHE``, which
    ``snapshot_download`` reads on every call (every supported version, 0.30 on). The loader is not patched.
    """
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
