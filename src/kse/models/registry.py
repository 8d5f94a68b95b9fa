"""Model registry: ``register_model``, ``get_model``, ``list_models``.

Every model built by :func:`get_model` remembers how it was built (``model.kse_arch``), so
that :func:`kse.save` can write the architecture into a file and :func:`kse.load` can
rebuild it without the caller naming it again.

Example::

    >>> from kse.models import get_model
    >>> net = get_model("resnet20", num_classes=10, in_channels=1)
    >>> net.kse_arch["name"]
    'resnet20'
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch.nn as nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that adds a model builder under ``name``; a duplicate name raises.

    The builder takes ``num_classes`` and ``in_channels`` as keywords, then its own arguments
    (JSON values: :func:`get_model` records them so that ``kse.load`` can build the model again)."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return wrap


def list_models() -> List[str]:
    """Sorted names of every registered model."""
    _ensure_torchvision()
    return sorted(_MODELS)


def get_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build model ``name`` and record its arguments in ``model.kse_arch``.

    Raises ``ValueError`` for an unknown name, listing the valid choices.
    """
    _ensure_torchvision()
    if name not in _MODELS:
        raise ValueError(
            f"unknown model {name!r}; choose one of: {', '.join(sorted(_MODELS))}"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    model = _MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    model.kse_arch = {
        "name": name,
        "kwargs": {"num_classes": num_classes, "in_channels": in_channels, **kwargs},
    }
    return model


def _ensure_torchvision() -> None:
    # Imported lazily: registering ~80 torchvision builders is cheap but touches torchvision.
    from . import torchvision_models  # noqa: F401
