"""Small helpers on module trees: swap a submodule by name, run in eval mode and restore."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Sequence

import torch

import torch.nn as nn
from torch import Tensor


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (a dotted path) by ``module``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def check_has_values(model: nn.Module, what: str) -> None:
    """``ValueError`` if a parameter or buffer of ``model`` is on the meta device (shapes only,
    no values): nothing can be measured or computed from it."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_meta:
            raise ValueError(f"cannot {what} a model on the meta device ({name} has no values); give it weights "
                             "first: model.to_empty(device='cpu') and load_state_dict(...), or build it on a real "
                             "device")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; afterwards give every submodule back its own mode
    (a frozen BatchNorm inside a training model stays frozen)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def capture_layer_inputs(model: nn.Module, names: Sequence[str], x: Tensor) -> Dict[str, Tensor]:
    """The input each named module receives when ``model(x)`` runs (eval mode, no grad)."""
    seen: Dict[str, Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen.__setitem__(n, args[0].detach())) for n in names]
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen
