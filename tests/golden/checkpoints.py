"""Writers of the golden checkpoints: seeded tiny models from the real transformers config classes.

Each writer builds a tiny model with the real ``transformers`` classes, gives it seeded weights and writes it
in the layout the backbone's ``weights=`` reads, in bf16 as the releases are:

* ``internvl_native``: ``InternVLForConditionalGeneration`` (InternViT-300M-like tower, projector, a one-layer
  Qwen2), ``save_pretrained`` (the ``-hf`` layout);
* ``internvit_6b_native``: the same with the InternViT-6B choices (RMS norm, qk normalisation, no qkv bias);
* ``earthmind_release``: the native tower and projector renamed into EarthMind's released remote-code layout
  (``sa2va_chat`` config, ``vision_model.*`` with fused ``qkv``, ``mlp1.*``, ``local_query``,
  ``language_model.*``) by :data:`REMOTE_NAMES`, written independently of the package's key map so that a
  change there shows;
* ``granite_native``: ``GraniteMoeHybridForCausalLM``, ``save_pretrained``, with the released config's layer
  type names (``mamba`` / ``attention``) so that transformers 4.x reads it too.

The weights are scaled on purpose (small embeddings and layer scales) so that the inputs of the norms have a
small mean square (about 1e-3): then a norm epsilon moved from 1e-6 to 1e-5 changes the features by about
1e-3 of their scale, far above the float32 spread between environments. The checkpoints are committed; these
writers run only on ``python -m tests.golden regenerate``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

#: Seed of every writer (recorded in the manifest).
SEED = 1234

_VISION = {
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "image_size": 42,
    "patch_size": 14,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
}
_VISION_300M = {**_VISION, "attention_bias": True, "use_qk_norm": False, "norm_type": "layer_norm"}
_VISION_6B = {**_VISION, "attention_bias": False, "use_qk_norm": True, "norm_type": "rms_norm"}
_TEXT = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 16,
    "vocab_size": 32,
}


def _seeded_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter a seeded value: matrices ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1), small rest.

    The embeddings (patch kernel, positions, CLS token) and the layer scales are kept small so that the
    residual stream, and with it the input of every norm, has a mean square of about 1e-3.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    with torch.no_grad():
        for name, param in model.named_parameters():
            shape = param.shape
            if re.search(r"patch_embeddings\.projection\.weight$", name):
                value = normal(shape, 0.004)
            elif re.search(r"(cls_token|position_embeddings)$", name):
                value = normal(shape, 0.03)
            elif re.search(r"lambda_[12]$", name):
                value = 0.01 + 0.02 * torch.rand(shape, generator=generator)
            elif "norm" in name and name.endswith("weight") and param.ndim == 1:
                value = 1.0 + normal(shape, 0.1)
            elif param.ndim >= 2:
                value = normal(shape, shape[-1] ** -0.5)
            elif name.endswith("bias"):
                value = normal(shape, 0.01)
            else:  # Mamba's A_log, D, dt_bias: keep their own initialisation
                continue
            param.copy_(value.to(param.dtype))


def _internvl(vision: dict, seed: int):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    torch.manual_seed(seed)
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(**vision, use_mean_pooling=True).to_dict(),
        text_config=Qwen2Config(**_TEXT).to_dict(),
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        image_token_id=5,
    )
    model = InternVLForConditionalGeneration(config).eval()
    _seeded_(model, seed)
    if vision["use_qk_norm"]:  # small queries and keys, so that the qk norms' epsilon matters as well
        with torch.no_grad():
            for name, param in model.named_parameters():
                if re.search(r"attention\.[qk]_proj\.weight$", name):
                    param.mul_(0.03)
    return model.to(torch.bfloat16)


def write_internvl_native(directory: Path, seed: int = SEED) -> None:
    """InternVL2.5-4B-like (InternViT-300M tower) in the native ``-hf`` layout."""
    _internvl(_VISION_300M, seed).save_pretrained(directory, safe_serialization=True)


def write_internvit_6b_native(directory: Path, seed: int = SEED) -> None:
    """An InternViT-6B-like tower (RMS norm, qk normalisation, no qkv bias) in the native layout."""
    _internvl(_VISION_6B, seed + 1).save_pretrained(directory, safe_serialization=True)


#: Native InternVL name -> EarthMind's released (remote-code) name. The fused ``qkv`` is ``cat(q, k, v)`` along
#: dimension 0, as the remote InternViT's ``qkv.reshape(B, N, 3, heads, head_dim)`` reads it.
_NATIVE, _REMOTE = r"model\.vision_tower\.encoder\.layer\.(\d+)\.", r"vision_model.encoder.layers.\1."
REMOTE_NAMES: tuple[tuple[str, str], ...] = (
    (r"model\.vision_tower\.embeddings\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"model\.vision_tower\.embeddings\.position_embeddings", "vision_model.embeddings.position_embedding"),
    (
        r"model\.vision_tower\.embeddings\.patch_embeddings\.projection\.(weight|bias)",
        r"vision_model.embeddings.patch_embedding.\1",
    ),
    (_NATIVE + r"attention\.projection_layer\.(weight|bias)", _REMOTE + r"attn.proj.\2"),
    (_NATIVE + r"attention\.(q|k)_norm\.weight", _REMOTE + r"attn.\2_norm.weight"),
    (_NATIVE + r"mlp\.(fc1|fc2)\.(weight|bias)", _REMOTE + r"mlp.\2.\3"),
    (_NATIVE + r"layernorm_before\.(weight|bias)", _REMOTE + r"norm1.\2"),
    (_NATIVE + r"layernorm_after\.(weight|bias)", _REMOTE + r"norm2.\2"),
    (_NATIVE + r"lambda_1", _REMOTE + "ls1"),
    (_NATIVE + r"lambda_2", _REMOTE + "ls2"),
    (r"model\.multi_modal_projector\.layer_norm\.(weight|bias)", r"mlp1.0.\1"),
    (r"model\.multi_modal_projector\.linear_1\.(weight|bias)", r"mlp1.1.\1"),
    (r"model\.multi_modal_projector\.linear_2\.(weight|bias)", r"mlp1.3.\1"),
    (r"model\.language_model\.(.+)", r"language_model.model.\1"),
    (r"lm_head\.weight", "language_model.lm_head.weight"),
)
_QKV = re.compile(_NATIVE + r"attention\.([qkv])_proj\.(weight|bias)")


def write_earthmind_release(directory: Path, seed: int = SEED) -> None:
    """EarthMind-4B-like in its released remote-code layout (``sa2va_chat``), from the native classes."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    model = _internvl(_VISION_300M, seed + 2)
    native = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    remote: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in native.items():
        if match := _QKV.fullmatch(key):
            layer, part, kind = match.groups()
            fused.setdefault((layer, kind), {})[part] = tensor
            continue
        for pattern, target in REMOTE_NAMES:
            if re.fullmatch(pattern, key):
                remote[re.sub(pattern, target, key)] = tensor
                break
        else:
            raise KeyError(f"no released name for {key}")
    for (layer, kind), parts in fused.items():
        remote[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat([parts[p] for p in "qkv"])
    generator = torch.Generator().manual_seed(seed + 3)
    width = _TEXT["hidden_size"]
    remote["local_query"] = (torch.randn(2, width, generator=generator) * width**-0.5).to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(remote, str(directory / "model.safetensors"), metadata={"format": "pt"})
    vision = {
        **{k: v for k, v in _VISION_300M.items() if k not in ("attention_bias", "use_qk_norm")},
        "qkv_bias": True,
        "qk_normalization": False,
        "use_flash_attn": False,
        "drop_path_rate": 0.0,
        "initializer_factor": 0.1,
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
    }
    config = {
        "architectures": ["Sa2VAChatModel"],
        "auto_map": {"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig"},
        "model_type": "sa2va_chat",
        "downsample_ratio": 0.5,
        "force_image_size": _VISION["image_size"],
        "ps_version": "v2",
        "select_layer": -1,
        "template": "qwen2_chat",
        "torch_dtype": "bfloat16",
        "vision_config": vision,
        "llm_config": {**Qwen2Config(**_TEXT).to_dict(), "architectures": ["Qwen2ForCausalLM"]},
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


_GRANITE = {
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 8,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "shared_intermediate_size": 16,
    "mamba_n_heads": 4,
    "mamba_d_head": 8,
    "mamba_d_state": 8,
    "mamba_n_groups": 1,
    "mamba_expand": 2,
    "mamba_d_conv": 4,
    "mamba_chunk_size": 3,
    "position_embedding_type": "nope",
    "rms_norm_eps": 1e-5,
    "embedding_multiplier": 0.05,
    "residual_multiplier": 0.05,
    "attention_multiplier": 8**-0.5,
    "logits_scaling": 1.0,
}
_GRANITE_LAYERS = ("mamba", "attention", "mamba", "attention")


def write_granite_native(directory: Path, seed: int = SEED) -> None:
    """Granite-4.0-H-like (Mamba-2, attention, MoE) in the native layout, with the released layer-type names."""
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    torch.manual_seed(seed + 4)
    config = GraniteMoeHybridConfig(**_GRANITE, layer_types=list(_GRANITE_LAYERS))
    model = GraniteMoeHybridForCausalLM(config).eval()
    _seeded_(model, seed + 4)
    model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    path = directory / "config.json"
    saved = json.loads(path.read_text())
    # Written as the release's config.json is (transformers 4.x names), so that every version of the matrix reads
    # it: 5.x writes linear_attention / full_attention, rope_parameters, and time_step_limit with an infinity
    # that 4.x cannot parse (the default, (0, inf), is what the release uses).
    saved["layer_types"] = list(_GRANITE_LAYERS)
    saved.pop("layers_block_type", None)
    saved.pop("time_step_limit", None)
    saved["rope_theta"] = saved.pop("rope_parameters", {}).get("rope_theta", 10000.0)
    saved["torch_dtype"] = "bfloat16"
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


#: Checkpoint directory name -> writer.
WRITERS: dict[str, Callable[[Path], None]] = {
    "internvl_native": write_internvl_native,
    "internvit_6b_native": write_internvit_6b_native,
    "earthmind_release": write_earthmind_release,
    "granite_native": write_granite_native,
}
