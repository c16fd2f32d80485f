"""Version detection: which torch / TerraTorch / transformers / peft / bitsandbytes versions the matrix has tested.

The tested ranges are not kept by hand: ``nox -s render`` (``python -m tools.matrix render``) derives them from
the committed matrix results (the versions really installed by the cells that passed) and writes them to
``tested_versions.json`` next to this module, which is read here. Outside them the package still imports,
with an :class:`UntestedVersionWarning` naming the version, the tested range and the cells that prove it.
"""

from __future__ import annotations

import json
import platform
import warnings
from importlib import metadata, resources

from packaging.version import InvalidVersion, Version

#: Rendered from the matrix results; ``tests/test_matrix.py`` checks that it is current.
TESTED_VERSIONS_FILE = "tested_versions.json"


def _load_tested_ranges() -> dict[str, tuple[str, str]]:
    data = json.loads(resources.files(__package__).joinpath(TESTED_VERSIONS_FILE).read_text(encoding="utf-8"))
    return {package: (entry["low"], entry["high"]) for package, entry in data["ranges"].items()}


#: Lowest and highest installed version of each package over the matrix cells that passed (see module doc).
TESTED_RANGES: dict[str, tuple[str, str]] = _load_tested_ranges()


class UntestedVersionWarning(UserWarning):
    """An installed dependency is outside the versions the compatibility matrix has tested."""


def installed_version(package: str) -> str | None:
    """The installed version of ``package`` or ``None``."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def installed_versions() -> dict[str, str]:
    """Versions of Python and of the packages a matrix cell is defined by (``"not installed"`` if absent)."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "terratorch", "transformers", "bitsandbytes", "peft", "earthmind-compat"):
        versions[package] = installed_version(package) or "not installed"
    return versions


def untested_versions(versions: dict[str, str | None] | None = None) -> list[str]:
    """Describe every dependency whose version lies outside :data:`TESTED_RANGES`.

    Args:
        versions: Package -> version to judge (default: what is installed).

    Returns:
        One sentence per untested package; empty when everything is inside the tested ranges.
    """
    if versions is None:
        versions = {package: installed_version(package) for package in TESTED_RANGES}
    problems = []
    for package, (low, high) in TESTED_RANGES.items():
        found = versions.get(package)
        if found is None:
            continue
        try:
            release = Version(Version(found).base_version)  # 2.7.0+cu126 -> 2.7.0
        except InvalidVersion:
            problems.append(f"{package} {found} has a version string that cannot be compared")
            continue
        if not Version(low) <= release <= Version(high):
            problems.append(f"{package} {found} is outside the tested range {low} .. {high}")
    return problems


def warn_if_untested(versions: dict[str, str | None] | None = None) -> list[str]:
    """Emit one :class:`UntestedVersionWarning` listing untested versions; return the list."""
    problems = untested_versions(versions)
    if problems:
        warnings.warn(
            "earthmind-compat has not been tested with: " + "; ".join(problems) + ". Run `earthmind-compat "
            "check` to certify this environment, or install versions from the README's compatibility table.",
            UntestedVersionWarning,
            stacklevel=2,
        )
    return problems


def require_native_model_classes() -> None:
    """Fail early, with the fix, when transformers lacks the native InternVL / GraniteMoeHybrid classes.

    Raises:
        ImportError: naming the installed transformers version and the first one that works.
    """
    import transformers

    missing = [name for name in ("InternVLVisionModel", "GraniteMoeHybridModel") if not hasattr(transformers, name)]
    if missing:
        raise ImportError(
            f"transformers {transformers.__version__} has no {', '.join(missing)}; earthmind-compat uses the "
            "native classes (never remote code), which first shipped in 4.52.1. Run: "
            "pip install 'transformers>=4.52.1'"
        )


#: First transformers release whose bitsandbytes integration quantizes at load time on a CPU without Intel's
#: IPEX: up to 4.52.x ``validate_bnb_backend_availability`` drops ``"cpu"`` from the usable devices unless
#: ``intel_extension_for_pytorch`` is importable and raises "None of the available devices ... are supported".
LOAD_TIME_CPU_QUANTIZATION_SINCE = "4.53.0"


def transformers_quantizes_on_cpu() -> bool:
    """Whether the installed transformers quantizes a checkpoint while loading it on the CPU (4.53.0 on)."""
    found = installed_version("transformers")
    return found is None or Version(Version(found).base_version) >= Version(LOAD_TIME_CPU_QUANTIZATION_SINCE)


def refuse_cpu_load_time_quantization() -> None:
    """Fail early, with the fix, where the installed transformers cannot quantize a checkpoint on the CPU.

    Raises:
        ConfigurationError: on transformers older than :data:`LOAD_TIME_CPU_QUANTIZATION_SINCE`.
    """
    from earthmind_compat.errors import ConfigurationError

    if not transformers_quantizes_on_cpu():
        found = installed_version("transformers")
        raise ConfigurationError(
            f"transformers {found} cannot quantize while loading on the CPU (its bitsandbytes check accepts a "
            f"CPU only with intel_extension_for_pytorch; fixed in {LOAD_TIME_CPU_QUANTIZATION_SINCE}). Install "
            f"'transformers>={LOAD_TIME_CPU_QUANTIZATION_SINCE}', or load in full precision and quantize in place "
            "(the backbone's quantization option, or earthmind_compat.optimize.quantize_linears)."
        )


def dtype_keyword() -> str:
    """The ``from_pretrained`` keyword for the model dtype: ``dtype`` from transformers 4.56, ``torch_dtype`` before."""
    found = installed_version("transformers")
    return "dtype" if found is None or Version(Version(found).base_version) >= Version("4.56.0") else "torch_dtype"


def call_with_hidden_states(model: object, *args: object, **kwargs: object) -> object:
    """Call a transformers model asking for every layer's hidden states, in a way every version accepts.

    transformers 4.57's ``InternVLVisionModel.forward`` is wrapped by ``@check_model_inputs`` but has no
    ``**kwargs``, so ``model(x, output_hidden_states=True)`` raises ``TypeError`` there. The flag is set on the
    model's config for the duration of the call instead, which every version reads.
    """
    config = model.config
    previous = getattr(config, "output_hidden_states", False)
    config.output_hidden_states = True
    try:
        return model(*args, **kwargs)
    finally:
        config.output_hidden_states = previous


def call_decoder_layer(
    layer: object,
    hidden: object,
    position_embeddings: tuple,
    position_ids: object,
    attention_mask: object | None,
    is_causal: bool = False,
) -> object:
    """Call one transformers decoder layer (e.g. ``Qwen2DecoderLayer``) outside its model's loop, in every version.

    transformers 4.52 returns a tuple and 5.x the hidden states alone (:func:`first_tensor` takes either).
    ``attention_mask`` is an additive 4-D mask or ``None``; ``is_causal`` reaches the attention function as a
    keyword in 4.x and 5.x alike. With ``attention_mask=None``, ``is_causal=False`` means no mask at all
    (bidirectional) with the SDPA and eager implementations, and ``is_causal=True`` SDPA's own causal masking,
    which is what the language model itself uses without padding (eager attention ignores the flag: give it a mask).
    """
    return first_tensor(
        layer(
            hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            is_causal=is_causal,
        )
    )


def first_tensor(output: object) -> object:
    """The hidden states of a transformers sub-module's output, across versions.

    transformers 4.x returns tuples from vision embeddings (``(embeddings, (rows, cols))``) and decoder
    layers (``(hidden_states, ...)``); 5.x returns the tensor alone.
    """
    return output[0] if isinstance(output, (tuple, list)) else output


#: The TerraTorch release whose ``EncoderDecoderFactory`` first builds a task, for the tasks 1.0 lacks (read from the
#: wheels: ``SCALAR_TASKS`` is ``["classification"]`` in 1.1 and 1.1.1, ``["classification", "scalar_regression"]``
#: from 1.2.0).
FACTORY_TASKS_SINCE = {"scalar_regression": "1.2"}


def factory_tasks() -> tuple[str, ...]:
    """The tasks the installed TerraTorch's ``EncoderDecoderFactory`` builds.

    TerraTorch 1.0 and 1.1 build ``segmentation``, ``regression`` and ``classification``;
    ``scalar_regression`` arrived in 1.2 (:data:`FACTORY_TASKS_SINCE`).
    """
    from terratorch.models import encoder_decoder_factory

    return tuple(encoder_decoder_factory.SUPPORTED_TASKS)


def factory_takes_num_outputs() -> bool:
    """Whether ``EncoderDecoderFactory.build_model`` takes ``num_outputs`` (from TerraTorch 1.1).

    TerraTorch 1.0's pixel-wise regression always has one output and refuses ``num_outputs`` as an unused
    argument.
    """
    import inspect

    from terratorch.models import EncoderDecoderFactory

    return "num_outputs" in inspect.signature(EncoderDecoderFactory.build_model).parameters


def terratorch_at_least(version: str) -> bool:
    """Whether the installed TerraTorch release is ``version`` or newer (local suffixes ignored)."""
    installed = installed_version("terratorch")
    return installed is not None and Version(Version(installed).base_version) >= Version(version)


def necks_receive_image_size() -> bool:
    """Whether TerraTorch's models call ``neck(features, image_size=...)`` (1.1+) rather than ``neck(features)``.

    Without the image size, :class:`~earthmind_compat.necks.TokensToGrid` can only place square token grids.
    """
    return terratorch_at_least("1.1")
