"""Technique names and their parsing: ``"nf4+lora+ckpt"`` -> a :class:`Techniques` value.

A technique string joins names with ``+``. Quantization names are exclusive (one of ``int8``, ``nf4``,
``fp4``); ``dq`` (double quantization of the 4-bit scales) needs ``nf4`` or ``fp4``; ``qlora`` is the
QLoRA recipe, ``nf4+dq+lora`` with k-bit training preparation; ``ckpt`` is activation checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass

from earthmind_compat.errors import ConfigurationError, unknown_name

#: Every technique name accepted in a technique string, with what it does.
TECHNIQUES: dict[str, str] = {
    "none": "full precision, every parameter trained",
    "int8": "bitsandbytes LLM.int8() weights (Linear8bitLt) for every linear layer of the blocks",
    "nf4": "bitsandbytes 4-bit NormalFloat weights (Linear4bit) for every linear layer and MoE expert",
    "fp4": "bitsandbytes 4-bit float weights (Linear4bit) for every linear layer and MoE expert",
    "dq": "double quantization: the 4-bit block scales are themselves quantized (needs nf4 or fp4)",
    "lora": "peft LoRA adapters on the backbone's target modules; the base weights are frozen",
    "qlora": "QLoRA: nf4 + dq + k-bit training preparation + LoRA",
    "ckpt": "activation checkpointing of every block, or every n-th (checkpoint_every=n); recomputed in the backward",
}

QUANTIZATIONS = ("int8", "nf4", "fp4")


@dataclass(frozen=True)
class Techniques:
    """A parsed technique string.

    Attributes:
        quantization: ``None``, ``"int8"``, ``"nf4"`` or ``"fp4"``.
        double_quant: Quantize the 4-bit block scales too (bitsandbytes ``compress_statistics``).
        lora: Add LoRA adapters and freeze the base weights.
        kbit_prep: Run peft's ``prepare_model_for_kbit_training`` before adding LoRA (QLoRA).
        checkpointing: Activation checkpointing of the blocks (all, or every n-th by ``apply(checkpoint_every=n)``).
    """

    quantization: str | None = None
    double_quant: bool = False
    lora: bool = False
    kbit_prep: bool = False
    checkpointing: bool = False

    @property
    def name(self) -> str:
        """Canonical technique string (``"none"`` when nothing is enabled)."""
        parts = []
        if self.quantization:
            parts.append(self.quantization)
        if self.double_quant:
            parts.append("dq")
        if self.lora:
            parts.append("lora")
        if self.checkpointing:
            parts.append("ckpt")
        return "+".join(parts) or "none"

    @property
    def trains_base(self) -> bool:
        """Whether the base weights receive gradients (no LoRA and no quantization)."""
        return not self.lora and self.quantization is None

    @property
    def bits(self) -> int:
        """Bits per quantized weight: 4, 8, or 32 without quantization."""
        return {"int8": 8, "nf4": 4, "fp4": 4}.get(self.quantization or "", 32)


def parse_technique(technique: str | Techniques | None) -> Techniques:
    """Parse ``"nf4+lora+ckpt"`` (or ``None`` / ``"none"``) into :class:`Techniques`.

    Args:
        technique: Names from :data:`TECHNIQUES` joined by ``+``, or an already parsed value.

    Returns:
        The parsed techniques.

    Raises:
        UnknownNameError: for a name that is not a technique, with the closest ones.
        ConfigurationError: for contradicting names (two quantizations, ``dq`` without 4-bit).
    """
    if isinstance(technique, Techniques):
        return technique
    if technique is None:
        return Techniques()
    if not isinstance(technique, str):
        raise ConfigurationError(f"technique must be a string such as 'nf4+lora+ckpt', got {technique!r}.")
    names = [part.strip().lower() for part in technique.split("+") if part.strip()]
    quantization = None
    double_quant = lora = kbit_prep = checkpointing = False
    for name in names:
        if name not in TECHNIQUES:
            raise unknown_name("technique", name, TECHNIQUES)
        if name in QUANTIZATIONS or name == "qlora":
            wanted = "nf4" if name == "qlora" else name
            if quantization is not None and quantization != wanted:
                raise ConfigurationError(
                    f"{technique!r} asks for two quantizations ({quantization} and {wanted}); keep one."
                )
            quantization = wanted
        if name == "qlora":
            double_quant = lora = kbit_prep = True
        elif name == "dq":
            double_quant = True
        elif name == "lora":
            lora = True
        elif name == "ckpt":
            checkpointing = True
    if double_quant and quantization not in ("nf4", "fp4"):
        raise ConfigurationError(
            f"{technique!r}: 'dq' quantizes the scales of 4-bit weights; combine it with nf4 or fp4 (e.g. 'nf4+dq')."
        )
    if lora and quantization is not None:
        kbit_prep = True
    return Techniques(quantization, double_quant, lora, kbit_prep, checkpointing)
