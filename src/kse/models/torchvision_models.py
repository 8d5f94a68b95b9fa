"""Every torchvision classification model, by its torchvision name.

``get_model("resnet50", num_classes=1000, weights="DEFAULT")`` passes ``weights`` to
torchvision, which loads them from its cache (this package never downloads at test time).
For ``in_channels != 3`` the stem convolution is replaced by one with the same
hyper-parameters and the new input width.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn
import torchvision

from .registry import _MODELS


def _first_conv(model: nn.Module) -> Optional[str]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name
    return None


def _builder(tv_name: str):
    def build(num_classes: int = 1000, in_channels: int = 3, weights: Optional[str] = None, **kw: Any) -> nn.Module:
        if weights is not None and num_classes != 1000:
            model = torchvision.models.get_model(tv_name, weights=weights, **kw)
            _replace_classifier(model, num_classes)
        else:
            model = torchvision.models.get_model(tv_name, weights=weights, num_classes=num_classes, **kw)
        if in_channels != 3:
            name = _first_conv(model)
            old = model.get_submodule(name)
            new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                            old.dilation, old.groups, old.bias is not None, old.padding_mode)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
        return model

    build.__doc__ = f"torchvision.models.{tv_name}"
    return build


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    last = None
    for name, m in model.named_modules():
        if type(m) is nn.Linear:
            last = name
    if last is None:
        raise ValueError("cannot find a Linear classifier to resize for num_classes")
    old = model.get_submodule(last)
    parent, _, leaf = last.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf,
            nn.Linear(old.in_features, num_classes, old.bias is not None))


for _name in torchvision.models.list_models(module=torchvision.models):
    if _name not in _MODELS:
        _MODELS[_name] = _builder(_name)
