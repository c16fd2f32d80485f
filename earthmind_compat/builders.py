"""The backbone constructors TerraTorch registers: build a backbone class, then apply the memory techniques.

One builder per backbone class of :data:`earthmind_compat.backbones.BACKBONE_CLASSES`, made from its spec: a
plain function whose ``__name__`` is the registered name (``spec.name``), importable as
``earthmind_compat.builders.<name>``. Besides the class's own arguments, a builder takes the technique
options of :mod:`earthmind_compat.optimize.options` (``technique``, ``quantization``, ``lora``,
``activation_checkpointing``; ``backbone_<name>`` in a TerraTorch config): it takes them out, checks them
before anything is built, builds the class without them and applies them to the built backbone. The classes
themselves know nothing of the techniques, which live in a higher layer than the models.
"""

from __future__ import annotations

from collections.abc import Callable

from terratorch.registry import BACKBONE_REGISTRY

from earthmind_compat.backbones import BACKBONE_CLASSES, backbone_class
from earthmind_compat.backbones.base import TokenBackbone, argument_names, reject_unknown_kwargs
from earthmind_compat.optimize.options import OPTION_KEYS, apply_options, resolve_options


def build(cls: type[TokenBackbone], **kwargs: object) -> TokenBackbone:
    """Build backbone class ``cls`` and apply the technique options among ``kwargs``.

    Args:
        cls: A backbone class.
        **kwargs: Its constructor arguments and the options of :data:`OPTION_KEYS`.

    Raises:
        ConfigurationError: for bad options (before anything is built), or an argument neither the class nor
            the options know (naming the closest of both).
    """
    options = {key: kwargs.pop(key) for key in OPTION_KEYS if key in kwargs}
    resolve_options(options)  # fail on bad options before building anything
    accepted = argument_names(cls.__init__)
    unknown = {key: value for key, value in kwargs.items() if key not in accepted}
    reject_unknown_kwargs(cls.__name__, unknown, [*accepted, *OPTION_KEYS])
    backbone = cls(**kwargs)
    apply_options(backbone, options)
    return backbone


def _builder(cls: type[TokenBackbone]) -> Callable[..., TokenBackbone]:
    def builder(**kwargs: object) -> TokenBackbone:
        return build(cls, **kwargs)

    builder.__name__ = builder.__qualname__ = cls.spec.name
    builder.__module__ = __name__
    builder.__doc__ = (
        f"{cls.spec.summary}; see :class:`{cls.__module__}.{cls.__name__}` for the arguments, and "
        f"{', '.join(OPTION_KEYS)} (:mod:`earthmind_compat.optimize.options`)."
    )
    return builder


#: Every backbone constructor earthmind-compat registers in TerraTorch, by registered name.
BACKBONE_BUILDERS: dict[str, Callable[..., TokenBackbone]] = {
    name: _builder(cls) for name, cls in BACKBONE_CLASSES.items()
}
globals().update(BACKBONE_BUILDERS)  # earthmind_compat.builders.<name>, where pickle and TerraTorch look for it


def backbone_builder(name: str) -> Callable[..., TokenBackbone]:
    """The registered constructor of backbone ``name``.

    Raises:
        UnknownNameError: for a name that is not one of ours, with the closest names.
    """
    return BACKBONE_BUILDERS[backbone_class(name).spec.name]


def build_backbone(name: str, **kwargs: object) -> TokenBackbone:
    """Build one of our backbones by name through TerraTorch's registry.

    Args:
        name: A name from :data:`earthmind_compat.BACKBONES`.
        **kwargs: Constructor arguments (``preset``, ``in_chans``, ``out_indices``, ...) and technique options.

    Raises:
        UnknownNameError: for a name that is not ours, with the closest names.
    """
    backbone_class(name)
    return BACKBONE_REGISTRY.build(name, **kwargs)


__all__ = ["BACKBONE_BUILDERS", "backbone_builder", "build", "build_backbone"]
