"""Tell a user, in one sentence, why a checkpoint does not fit the backbone that loads it.

A Lightning checkpoint of a backbone fine-tuned with ``nf4+lora`` holds quantization state and adapter
tensors; loaded into a model built with another technique, preset, band count or backbone, PyTorch's strict
``load_state_dict`` lists hundreds of missing and unexpected keys. Every earthmind-compat backbone runs
:func:`check_state_matches` as a load pre-hook: it compares the incoming tensors with the model's own state
(names and shapes only, nothing is copied) and, where they disagree, raises :class:`CheckpointMismatchError`
naming both sides and the fix.

What the key names reveal: bitsandbytes 4-bit layers write ``weight.quant_state.bitsandbytes__nf4`` (or
``__fp4``) and, with double quantization, ``weight.nested_absmax``; 8-bit layers write ``SCB``; peft writes
``lora_A`` / ``lora_B`` and moves the wrapped weight under ``base_layer``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from earthmind_compat.errors import WeightsError

_QUANT_STATE_MARKERS = (
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
    ".SCB",
    ".weight_format",
)

#: The quantization part of a technique name, by the state-dict key ending bitsandbytes writes for it.
_TECHNIQUE_KEY_ENDINGS = (
    ("int8", ".SCB"),
    ("nf4", ".quant_state.bitsandbytes__nf4"),
    ("fp4", ".quant_state.bitsandbytes__fp4"),
    ("dq", ".nested_absmax"),
)


class CheckpointMismatchError(WeightsError):
    """A checkpoint was written by a backbone built differently from the one loading it."""


def technique_of(keys: set[str] | list[str]) -> str:
    """The memory technique a state dict was written with, read off its key names (``"none"`` if plain).

    Activation checkpointing leaves no trace in a state dict and is not reported.
    """
    parts = [name for name, ending in _TECHNIQUE_KEY_ENDINGS if any(k.endswith(ending) for k in keys)]
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        parts.append("lora")
    return "+".join(parts) or "none"


def base_key(key: str) -> str | None:
    """The key a plain (unquantized, adapter-free) model would use, or ``None`` for technique-only entries."""
    if ".lora_" in key or key.endswith(_QUANT_STATE_MARKERS) or any(m + "." in key for m in _QUANT_STATE_MARKERS):
        return None
    return key.replace(".base_layer.", ".")


def _base_shapes(state: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for key, value in state.items():
        plain = base_key(key)
        if plain is not None and isinstance(value, torch.Tensor):
            shapes[plain] = tuple(value.shape)
    return shapes


def describe_mismatch(owner: str, incoming: Mapping[str, object], own: Mapping[str, object]) -> str | None:
    """Explain why ``incoming`` cannot load into a model whose state is ``own`` (``None`` if it can).

    Args:
        owner: How to call the model in the message (class name and settings).
        incoming: The checkpoint's entries for this model, prefix removed.
        own: The model's own ``state_dict()``.

    Returns:
        One message naming the checkpoint's side, the model's side and the fix, or ``None``.
    """
    if set(incoming) == set(own) and all(
        not isinstance(own[k], torch.Tensor) or tuple(incoming[k].shape) == tuple(own[k].shape) for k in own
    ):
        return None
    their_shapes, our_shapes = _base_shapes(incoming), _base_shapes(own)
    common = set(their_shapes) & set(our_shapes)
    if len(common) < 0.5 * min(len(their_shapes), len(our_shapes)):
        example = sorted(set(their_shapes) - set(our_shapes))[:3]
        return (
            f"This checkpoint does not match {owner}: it holds another model (e.g. {example}). Load it with the "
            "backbone it was trained with."
        )
    theirs, ours = technique_of(list(incoming)), technique_of(list(own))
    if theirs != ours:  # quantized shapes and split experts differ too; the technique is the one cause
        return (
            f"This checkpoint does not match {owner}: it was saved with technique {theirs!r} and this model is "
            f"built with {ours!r}. Build it with backbone_technique: {theirs} (add +ckpt for activation "
            "checkpointing, which a checkpoint does not record)."
        )
    problems = []
    for key in sorted(common):
        theirs_shape, ours_shape = their_shapes[key], our_shapes[key]
        if theirs_shape == ours_shape:
            continue
        if len(ours_shape) == 4 and theirs_shape[0] == ours_shape[0] and theirs_shape[1] != ours_shape[1]:
            problems.append(
                f"its {key} takes {theirs_shape[1]} input bands and this model's {ours_shape[1]}; set "
                "backbone_bands / backbone_in_chans (or modalities) to what the checkpoint was trained on"
            )
        else:
            problems.append(
                f"its {key} is {list(theirs_shape)} and this model's {list(ours_shape)}: another preset or model "
                "width; use the backbone_preset the checkpoint was trained with"
            )
        break  # the first differing shape tells the story; the rest follow from it
    if not problems:
        missing = sorted(set(our_shapes) - set(their_shapes))
        unexpected = sorted(set(their_shapes) - set(our_shapes))
        if missing or unexpected:
            problems.append(
                f"it lacks {missing[:3]}{' ...' if len(missing) > 3 else ''} and has "
                f"{unexpected[:3]}{' ...' if len(unexpected) > 3 else ''} beyond this model: other layer or "
                "projector settings (preset depth, with_projector, modalities) than at training time"
            )
    if not problems:
        return None
    return f"This checkpoint does not match {owner}: " + "; ".join(problems) + "."


def check_state_matches(
    module: nn.Module,
    state_dict: Mapping[str, object],
    prefix: str,
    local_metadata: object,
    strict: bool,
    *_: object,
) -> None:
    """``load_state_dict`` pre-hook of every backbone: raise :class:`CheckpointMismatchError` on a mismatch.

    Non-strict loads (partial weights on purpose) are left to the caller.
    """
    if not strict:
        return
    incoming = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not incoming:
        return
    owner = getattr(module, "describe", lambda: type(module).__name__)()
    message = describe_mismatch(owner, incoming, module.state_dict())
    if message is not None:
        raise CheckpointMismatchError(message)
