"""bitsandbytes quantization: at load time through ``BitsAndBytesConfig``, or in place on a built model.

In place, every ``nn.Linear`` becomes a ``bnb.nn.Linear4bit`` (nf4 / fp4, optionally with double-quantized
scales) or a ``bnb.nn.Linear8bitLt`` (LLM.int8(), weights kept in int8). The MoE expert stacks that
bitsandbytes does not see are handled by :mod:`earthmind_compat.optimize.experts`.

CPU note: on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place the first time the layer
runs in eval mode without gradients, asserting ``out_features % 32 == 0``; the repacked layout then breaks
training the same layer. Layers quantized here have that repacking switched off, so every CPU takes the
same (portable) code path and a model can alternate between evaluation and training. On CPUs whose
AVX-512 kernel dequantizes rows that split 4-bit blocks wrongly, such layers get a correct forward pass
(:mod:`earthmind_compat.optimize.bnb_cpu`).

Checkpoints: a 4-bit layer writes its quantization state next to its packed weight (``weight.absmax``,
``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``), but bitsandbytes gives
``Linear4bit`` no way to read them back, so a strict ``load_state_dict`` (Lightning's, TerraTorch's) rejects
them. :func:`restore_quant_state_on_load` gives every 4-bit layer made here a load hook that rebuilds the
layer's ``QuantState`` from those entries, the way transformers' bitsandbytes integration does for
``from_pretrained``. 8-bit layers read their row scales (``SCB``) themselves, but only until their first
forward pass, which moves the scales from the weight to the layer's matmul state; their hook puts them back
first, so a model that has already run (a fresh Lightning task after its sanity check, a model evaluated
before loading) still loads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from earthmind_compat.compat import dtype_keyword, refuse_cpu_load_time_quantization
from earthmind_compat.errors import ConfigurationError, unknown_name
from earthmind_compat.optimize.techniques import QUANTIZATIONS

#: bitsandbytes' 4-bit block size (elements sharing one absmax scale).
BLOCKSIZE_4BIT = 64


def _bnb():
    import bitsandbytes as bnb

    return bnb


def _check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise unknown_name("quantization", quantization, QUANTIZATIONS)


def bnb_config(
    quantization: str,
    double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
    skip_modules: Iterable[str] | None = None,
):
    """The ``transformers.BitsAndBytesConfig`` for a quantization name.

    Args:
        quantization: ``"int8"``, ``"nf4"`` or ``"fp4"``.
        double_quant: Double-quantize the 4-bit scales (``bnb_4bit_use_double_quant``).
        compute_dtype: dtype of the 4-bit matmuls (default float32; bfloat16 on a GPU is usual).
        skip_modules: Module names kept in full precision (``llm_int8_skip_modules``).

    Returns:
        A ``BitsAndBytesConfig``.
    """
    from transformers import BitsAndBytesConfig

    _check_quantization(quantization)
    skip = list(skip_modules) if skip_modules is not None else None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
        llm_int8_skip_modules=skip,
    )


def load_quantized(
    model_class: type,
    directory: str | os.PathLike,
    quantization: str,
    double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
    device_map: str | dict = "cpu",
    **kwargs: object,
):
    """Load a transformers model from a local safetensors checkpoint, quantized while loading.

    This is transformers' own path (``from_pretrained(quantization_config=BitsAndBytesConfig(...))``): weights
    are quantized tensor by tensor, so the full-precision model never sits in memory at once.

    Args:
        model_class: A transformers model class, e.g. ``GraniteMoeHybridModel``.
        directory: Directory written by ``save_pretrained`` (safetensors).
        quantization: ``"int8"``, ``"nf4"`` or ``"fp4"``.
        double_quant: Double-quantize the 4-bit scales.
        compute_dtype: dtype of the 4-bit matmuls.
        device_map: Where to quantize and keep the weights (``"cpu"``, ``"cuda:0"``, ``"auto"``).
        **kwargs: Passed to ``from_pretrained``.

    Returns:
        The loaded, quantized model. MoE expert stacks are still full precision: pass the model to
        :func:`earthmind_compat.optimize.experts.quantize_experts` for them.

    Raises:
        ConfigurationError: on the CPU with a transformers release that refuses to quantize there (before 4.53).
    """
    if not _on_accelerator(device_map):
        refuse_cpu_load_time_quantization()
    config = bnb_config(quantization, double_quant, compute_dtype, kwargs.pop("skip_modules", None))
    # The parameters bitsandbytes does not quantize keep the checkpoint's dtype: transformers 4.x would load
    # them in float16 (its bitsandbytes default), which also changes the MoE experts quantized afterwards.
    if "dtype" not in kwargs and "torch_dtype" not in kwargs:
        kwargs[dtype_keyword()] = "auto"
    model = model_class.from_pretrained(
        str(directory),
        quantization_config=config,
        device_map=device_map,
        use_safetensors=True,
        trust_remote_code=False,
        **kwargs,
    )
    if quantization != "int8":
        from earthmind_compat.optimize.bnb_cpu import repair_partial_block_layers  # deferred: imports bitsandbytes

        repair_partial_block_layers(model)  # see earthmind_compat.optimize.bnb_cpu
    for layer in model.modules():
        if is_quantized_linear(layer):
            restore_quant_state_on_load(layer)
    return model


def _on_accelerator(device_map: str | dict) -> bool:
    """Whether ``device_map`` places anything on an accelerator (``"auto"`` does so only where CUDA exists)."""
    places = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
    places = {str(place) for place in places}
    if places == {"auto"}:
        return torch.cuda.is_available()
    return any(place not in ("cpu", "disk") for place in places)


#: Marks a layer whose load hook is installed, so it is installed once.
_RELOAD_HOOK_FLAG = "_earthmind_restores_quant_state"


def _load_quant_state(layer: nn.Module, state_dict: dict, prefix: str, *_: object) -> None:
    """``load_state_dict`` pre-hook: take this layer's quant-state entries and rebuild its ``QuantState``.

    The entries are removed from ``state_dict`` (they are not parameters, so a strict load would call them
    unexpected); the packed weight itself is then copied by the ordinary loader. A checkpoint without the
    entries leaves the layer's present state alone (the caller's strict load reports the rest).
    """
    from bitsandbytes.functional import QuantState

    stats_prefix = prefix + "weight."
    keys = [key for key in state_dict if key.startswith(stats_prefix)]
    if not keys:
        return
    stats = {key[len(stats_prefix) :]: state_dict.pop(key) for key in keys}
    quant_state = QuantState.from_dict(stats, device=layer.weight.device)
    layer.weight.quant_state = quant_state
    layer.quant_state = quant_state


def _return_int8_scales(layer: nn.Module, *_: object) -> None:
    """``load_state_dict`` pre-hook of an 8-bit layer: give the weight back the row scales its forward took.

    bitsandbytes' own loader copies ``SCB`` into ``weight.SCB`` and refuses when it is ``None``, which it is
    after the first forward pass (the scales then live in ``layer.state.SCB``, the same tensor).
    """
    if getattr(layer.weight, "SCB", None) is None and getattr(layer.state, "SCB", None) is not None:
        layer.weight.SCB = layer.state.SCB


def restore_quant_state_on_load(layer: nn.Module) -> nn.Module:
    """Make a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` loadable from its own ``state_dict()``, strictly.

    Args:
        layer: A ``bnb.nn.Linear4bit`` or ``bnb.nn.Linear8bitLt`` (or subclass). Idempotent.

    Returns:
        ``layer``.
    """
    if not getattr(layer, _RELOAD_HOOK_FLAG, False):
        hook = _return_int8_scales if isinstance(layer, _bnb().nn.Linear8bitLt) else _load_quant_state
        layer._register_load_state_dict_pre_hook(hook, with_module=True)
        setattr(layer, _RELOAD_HOOK_FLAG, True)
    return layer


def quantize_linear(
    linear: nn.Linear,
    quantization: str,
    double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Return a bitsandbytes layer holding ``linear``'s weights quantized (on ``linear``'s device).

    Args:
        linear: A full-precision ``nn.Linear``.
        quantization: ``"int8"``, ``"nf4"`` or ``"fp4"``.
        double_quant: Double-quantize the 4-bit scales.
        compute_dtype: dtype of the 4-bit matmul (default: the input's dtype).

    Returns:
        A ``Linear4bit`` or ``Linear8bitLt`` with frozen quantized weights and the original bias.
    """
    _check_quantization(quantization)
    bnb = _bnb()
    device = linear.weight.device
    weight = linear.weight.detach()
    has_bias = linear.bias is not None
    with torch.device("meta"):
        if quantization == "int8":
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_bias, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                has_bias,
                compute_dtype=compute_dtype,
                compress_statistics=double_quant,
                quant_type=quantization,
                quant_storage=torch.uint8,
            )
    if quantization == "int8":
        layer.weight = bnb.nn.Int8Params(weight.float().cpu(), requires_grad=False, has_fp16_weights=False).to(device)
        restore_quant_state_on_load(layer)
    else:
        params = bnb.nn.Params4bit(
            weight.float(),
            requires_grad=False,
            blocksize=BLOCKSIZE_4BIT,
            compress_statistics=double_quant,
            quant_type=quantization,
            quant_storage=torch.uint8,
            module=layer,
        )
        layer.weight = params.to(device)
        layer.quant_state = layer.weight.quant_state
        # See the module docstring: no in-place CPU repacking (out_features % 32 assert, breaks training).
        layer.support_avx512bf16_for_cpu = False
        restore_quant_state_on_load(layer)
        from earthmind_compat.optimize.bnb_cpu import repair_layer  # deferred: imports bitsandbytes

        repair_layer(layer)  # rows that split 4-bit blocks on a CPU whose kernel gets them wrong
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    layer.train(linear.training)
    return layer


def quantize_linears(
    module: nn.Module,
    quantization: str,
    double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
    skip: Iterable[str] = (),
) -> list[str]:
    """Replace every plain ``nn.Linear`` inside ``module`` by its bitsandbytes counterpart, in place.

    Args:
        module: Any module (a backbone, a transformers model).
        quantization: ``"int8"``, ``"nf4"`` or ``"fp4"``.
        double_quant: Double-quantize the 4-bit scales.
        compute_dtype: dtype of the 4-bit matmuls.
        skip: Module paths (or their last component) to keep in full precision.

    Returns:
        The paths of the replaced layers.

    Raises:
        ConfigurationError: if weights are on the meta device (nothing to quantize yet).
    """
    _check_quantization(quantization)
    skip = set(skip)
    replaced = []
    # Paths first, modules one at a time: holding every old layer until the end would double the memory.
    paths = [p for p, child in module.named_modules() if type(child) is nn.Linear]
    for path in paths:
        if path in skip or path.rsplit(".", 1)[-1] in skip:
            continue
        child = module.get_submodule(path)
        if child.weight.device.type == "meta":
            raise ConfigurationError(
                f"{path} has its weights on the meta device; load or initialise the weights before quantizing "
                "(or use load_quantized to quantize while loading)."
            )
        module.set_submodule(path, quantize_linear(child, quantization, double_quant, compute_dtype))
        del child
        replaced.append(path)
    return replaced


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer."""
    bnb = _bnb()
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def stored_bytes(module: nn.Module) -> int:
    """Bytes of everything ``module.state_dict()`` holds: weights, biases, buffers and quantization state.

    For bitsandbytes layers this includes the packed weights plus their absmax scales, nested scales and
    code tables, i.e. exactly what a checkpoint of the quantized module stores.
    """
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


def weight_share(module: nn.Module) -> dict[str, int]:
    """Count the module's weight parameters by storage: 4-bit, 8-bit and full precision.

    Counts are in logical elements (a 4-bit weight of 512 x 512 counts 262,144 however it is packed). Works
    on the meta device.

    Returns:
        ``{"4bit": n, "8bit": n, "full": n, "total": n}``.
    """
    bnb = _bnb()
    counts = {"4bit": 0, "8bit": 0, "full": 0}
    seen: set[int] = set()
    for sub in module.modules():  # split MoE experts (QuantizedExperts) hold such layers, counted here too
        if isinstance(sub, bnb.nn.Linear4bit):
            counts["4bit"] += sub.in_features * sub.out_features
            seen.add(id(sub.weight))
        elif isinstance(sub, bnb.nn.Linear8bitLt):
            counts["8bit"] += sub.in_features * sub.out_features
            seen.add(id(sub.weight))
    for param in module.parameters():
        if id(param) not in seen:
            counts["full"] += param.numel()
    counts["total"] = counts["4bit"] + counts["8bit"] + counts["full"]
    return counts


def _quant_state_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    state = getattr(param, "quant_state", None)
    tensors = []
    if state is not None:
        tensors += [state.absmax, state.code]
        if getattr(state, "nested", False):
            tensors += [state.state2.absmax, state.state2.code, state.offset]
    scb = getattr(param, "SCB", None)
    if isinstance(scb, torch.Tensor):
        tensors.append(scb)
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def _weight_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters, their quantization state (absmax, code tables, row scales) and buffers of ``module``."""
    tensors: list[torch.Tensor] = []
    for param in module.parameters():
        tensors.append(param)
        tensors += _quant_state_tensors(param)
    return tensors + list(module.buffers())


def weight_storages(module: nn.Module) -> set[int]:
    """Data pointers of the storages of ``module``'s weights (see :func:`memory_bytes`), meta tensors left out.

    What autograd saves from these is weights, not activations (:func:`earthmind_compat.optimize.plan.saved_bytes`).
    """
    return {t.untyped_storage().data_ptr() for t in _weight_tensors(module) if t.device.type != "meta"}


def memory_bytes(module: nn.Module) -> int:
    """Bytes the module's weights occupy in memory, quantization state included, each storage counted once.

    Parameters and buffers count their data; a 4-bit weight adds its absmax scales and code table (and, with
    double quantization, the nested scales, nested code and offset); an 8-bit weight adds its row scales.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in _weight_tensors(module):
        if tensor.device.type == "meta":
            size = tensor.numel() * tensor.element_size()
            key = (id(tensor), size)
        else:
            storage = tensor.untyped_storage()
            size = storage.nbytes()
            key = (storage.data_ptr(), size)
        if key not in seen:
            seen.add(key)
            total += size
    return total
