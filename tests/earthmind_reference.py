"""A minimal re-implementation of EarthMind's remote-code image side, in its released key layout.

Used only by the tests: it writes tiny checkpoints named exactly as EarthMind's release names its tensors
(``vision_model.encoder.layers.N.attn.qkv``, ``mlp1.0``, ``local_query``, ``language_model.*`` ...) and
computes the remote forward (fused-qkv attention, ``norm1``/``ls1`` blocks, pixel shuffle v2, ``mlp1``), so
that the converted native model can be compared against it. Two ways of combining SAR and optical tokens, each
written as its source in shuyansy/EarthMind writes it:

* :meth:`RemoteEarthMind.generate_multi_tokens`, the released inference (``generate_multi`` in
  ``projects/llava_sam2/hf/models/modeling_earthmind_chat.py``, lines 572-574): per tile, the SAR tokens then
  the optical tokens, nothing gated;
* :meth:`RemoteEarthMind.training_gate`, the training class's gating (``InternVL_Slowfast._llm_forward`` in
  ``projects/llava_sam2/models/internvl.py``, lines 551-617): concatenate, split in halves, expand the queries,
  multiply, sum over the width, then over the queries, sigmoid, reweight, concatenate. No scaling: its
  ``2048 ** -0.5`` is commented out (line 107), and ``local_query`` is drawn as ``torch.randn(2, 2048)``
  (line 104; ``modeling_earthmind_chat.py`` line 116).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn


class RemoteRMSNorm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _norm(kind: str, width: int, eps: float) -> nn.Module:
    return RemoteRMSNorm(width, eps) if kind == "rms_norm" else nn.LayerNorm(width, eps=eps)


class RemoteEmbeddings(nn.Module):
    def __init__(self, width: int, image_size: int, patch: int) -> None:
        super().__init__()
        self.grid = image_size // patch
        self.class_embedding = nn.Parameter(torch.randn(1, 1, width))
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=patch, stride=patch)
        self.position_embedding = nn.Parameter(torch.randn(1, self.grid**2 + 1, width))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels)
        batch, _, rows, cols = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_embedding.expand(batch, 1, -1), patches], dim=1)
        grid_pos = self.position_embedding[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos.float(), size=(rows, cols), mode="bicubic", align_corners=False)
        grid_pos = grid_pos.reshape(1, -1, rows * cols).permute(0, 2, 1)
        return tokens + torch.cat([self.position_embedding[:, :1], grid_pos], dim=1)


class RemoteAttention(nn.Module):
    """Fused-qkv attention as in the remote InternViT (``_naive_attn``)."""

    def __init__(self, width: int, heads: int, qkv_bias: bool, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RemoteRMSNorm(width, eps)
            self.k_norm = RemoteRMSNorm(width, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.qk_norm:
            q = self.q_norm(q.transpose(1, 2).flatten(-2, -1)).view(batch, length, self.heads, -1).transpose(1, 2)
            k = self.k_norm(k.transpose(1, 2).flatten(-2, -1)).view(batch, length, self.heads, -1).transpose(1, 2)
        attention = ((q * (width // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(batch, length, width))


class RemoteMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class RemoteLayer(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        width, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.attn = RemoteAttention(width, cfg["num_attention_heads"], cfg["qkv_bias"], cfg["qk_normalization"], eps)
        self.mlp = RemoteMLP(width, cfg["intermediate_size"])
        self.norm1 = _norm(cfg["norm_type"], width, eps)
        self.norm2 = _norm(cfg["norm_type"], width, eps)
        self.ls1 = nn.Parameter(torch.rand(width) + 0.5)
        self.ls2 = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class RemoteEncoder(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.layers = nn.ModuleList(RemoteLayer(cfg) for _ in range(cfg["num_hidden_layers"]))


class RemoteVisionModel(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.embeddings = RemoteEmbeddings(cfg["hidden_size"], cfg["image_size"], cfg["patch_size"])
        self.encoder = RemoteEncoder(cfg)

    def hidden_states(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        states = [self.embeddings(pixels)]
        for layer in self.encoder.layers:
            states.append(layer(states[-1]))
        return states


def remote_pixel_shuffle(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()  # ps_version v2


class RemoteEarthMind(nn.Module):
    """The image side of the remote ``Sa2VAChatModel``, with EarthMind's two ways of combining SAR and optical."""

    def __init__(self, vision_cfg: dict, llm_hidden: int, select_layer: int = -1) -> None:
        super().__init__()
        self.select_layer = select_layer
        self.vision_model = RemoteVisionModel(vision_cfg)
        width = vision_cfg["hidden_size"] * 4
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden)
        )
        self.local_query = nn.Parameter(torch.randn(2, llm_hidden))  # as released: N(0, 1), not scaled

    def extract_feature(self, pixels: torch.Tensor) -> torch.Tensor:
        embeds = self.vision_model.hidden_states(pixels)[self.select_layer][:, 1:, :]
        side = int(embeds.shape[1] ** 0.5)
        embeds = remote_pixel_shuffle(embeds.reshape(embeds.shape[0], side, side, -1))
        return self.mlp1(embeds.reshape(embeds.shape[0], -1, embeds.shape[-1]))

    def generate_multi_tokens(self, sar_pixels: torch.Tensor, rgb_pixels: torch.Tensor) -> torch.Tensor:
        """The released inference: LLM image tokens ``[tiles, 2N, D]``, per tile the SAR tokens then the RGB ones."""
        return torch.cat([self.extract_feature(sar_pixels), self.extract_feature(rgb_pixels)], dim=1)

    def training_gate(
        self, sar_pixels: torch.Tensor, rgb_pixels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training class's gating: (LLM image tokens [B, 2N, D], SAR importance [B, N], RGB importance [B, N])."""
        tokens = torch.cat([self.extract_feature(sar_pixels), self.extract_feature(rgb_pixels)], dim=1)
        batch, total, _ = tokens.shape
        sar, rgb = tokens[:, : total // 2, :], tokens[:, total // 2 :, :]
        query = self.local_query.unsqueeze(0).unsqueeze(2).expand(batch, -1, -1, -1)  # (B, 2, 1, D)
        sar_importance = torch.sigmoid((rgb.unsqueeze(1) * (query * sar.unsqueeze(1))).sum(dim=-1).sum(dim=1))
        rgb_importance = torch.sigmoid((sar.unsqueeze(1) * (query * rgb.unsqueeze(1))).sum(dim=-1).sum(dim=1))
        tokens = torch.cat([sar * sar_importance.unsqueeze(-1), rgb * rgb_importance.unsqueeze(-1)], dim=1)
        return tokens, sar_importance, rgb_importance


#: A tiny EarthMind-4B-like vision config (layer norm, qkv bias) and an InternViT-6B-like one (RMS norm,
#: qk normalisation, no qkv bias), both in the remote config's names.
TINY_VISION = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 48,
    "image_size": 56,
    "patch_size": 14,
    "qkv_bias": True,
    "qk_normalization": False,
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
    "use_flash_attn": False,
    "drop_path_rate": 0.0,
}
TINY_VISION_QK_NORM = {**TINY_VISION, "qkv_bias": False, "qk_normalization": True, "norm_type": "rms_norm"}
TINY_LLM_HIDDEN = 24


def write_remote_checkpoint(
    directory: Path, vision_cfg: dict = TINY_VISION, select_layer: int = -1, seed: int = 0, extra: dict | None = None
) -> RemoteEarthMind:
    """Build a random :class:`RemoteEarthMind`, save it with a tiny language model, SAM2 and ``text_hidden_fcs``
    tensors in the released layout (two safetensors shards and a ``sa2va_chat`` config), and return it.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = RemoteEarthMind(vision_cfg, TINY_LLM_HIDDEN, select_layer).eval()
    llm_config = Qwen2Config(
        hidden_size=TINY_LLM_HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        vocab_size=40,
        architectures=["Qwen2ForCausalLM"],
    )
    language_model = Qwen2ForCausalLM(llm_config)
    text_hidden_fcs = nn.Sequential(
        nn.Linear(TINY_LLM_HIDDEN, TINY_LLM_HIDDEN), nn.ReLU(), nn.Linear(TINY_LLM_HIDDEN, 8)
    )
    image_side = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    rest = {f"language_model.{k}": v.detach().clone().contiguous() for k, v in language_model.state_dict().items()}
    rest.update({f"text_hidden_fcs.{k}": v.detach().contiguous() for k, v in text_hidden_fcs.state_dict().items()})
    rest["grounding_encoder.sam2_model.image_encoder.trunk.patch_embed.proj.weight"] = torch.randn(8, 3, 7, 7)
    rest["grounding_encoder.sam2_model.sam_mask_decoder.iou_token.weight"] = torch.randn(1, 8)
    rest.update(extra or {})
    directory.mkdir(parents=True, exist_ok=True)
    save_file(image_side, str(directory / "model-00001-of-00002.safetensors"))
    save_file(rest, str(directory / "model-00002-of-00002.safetensors"))
    config = {
        "architectures": ["Sa2VAChatModel"],
        "auto_map": {"AutoConfig": "configuration_earthmind_chat.Sa2VAChatConfig"},
        "model_type": "sa2va_chat",
        "downsample_ratio": 0.5,
        "force_image_size": vision_cfg["image_size"],
        "ps_version": "v2",
        "select_layer": select_layer,
        "template": "qwen_chat",
        "vision_config": {**vision_cfg, "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b"},
        "llm_config": llm_config.to_dict(),
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return model
