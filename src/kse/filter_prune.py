"""L1-norm filter pruning (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017):
the peer that KSE is compared against.

Each selected convolution loses the output filters with the smallest

    ||F_n||_1 = sum_{c, i, j} |W[n, c, i, j]|

together with everything that reads them (its BatchNorm channel, the next convolution's
input channel). The structural surgery is done by Torch-Pruning's ``DependencyGraph``; a
layer whose filters are tied to others (a residual sum, a concatenation) is refused, which is
why Li et al. prune only the first convolution of each residual block. The pruned model is an
ordinary dense network with narrower layers; ``kse.save`` / ``kse.load`` store it.

Example::

    >>> from kse.models import get_model
    >>> net = get_model("resnet20", num_classes=10, in_channels=1)
    >>> pruned = l1_prune_(net, 0.5, ["*.conv1"], torch.randn(1, 1, 28, 28))
    >>> net.layer1[0].conv1.out_channels
    8
"""

from __future__ import annotations

import fnmatch
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .module_utils import eval_mode

DEFAULT_LAYERS = ("*.conv1",)  # the first conv of every residual block (CIFAR and torchvision ResNets)


def l1_filter_norms(weight: Tensor) -> Tensor:
    """``||F_n||_1`` of every output filter of a conv weight ``Tensor[N, C, kh, kw]`` -> ``Tensor[N]``."""
    if weight.ndim != 4:
        raise ValueError(f"expected a conv weight of shape (N, C, kh, kw), got shape {tuple(weight.shape)}")
    return weight.detach().abs().sum(dim=(1, 2, 3))


def select_prunable(model: nn.Module, patterns: Sequence[str] = DEFAULT_LAYERS) -> List[str]:
    """Names of the plain ``nn.Conv2d`` layers (exact type, groups == 1) matching ``patterns``."""
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Conv2d and m.groups == 1 and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise ValueError(f"no plain nn.Conv2d layer matches {list(patterns)}; pass the names of the convs to prune "
                         "(e.g. '*.conv1' for the first conv of each residual block)")
    return names


def _n_remove(out_channels: int, ratio: float) -> int:
    return min(out_channels - 1, int(round(ratio * out_channels)))


def l1_prune_(model: nn.Module, ratio: float, patterns: Sequence[str], example_inputs: Tensor) -> Dict[str, List[int]]:
    """Remove ``round(ratio * N)`` filters of smallest L1 norm from every conv matching ``patterns``
    (at least one filter is kept), in place.

    Returns ``{layer name: removed filter indices}``. Raises ``ValueError`` for a layer whose
    filters are tied to another layer's (pruning it would change other layers' outputs).
    """
    import torch_pruning as tp

    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    names = select_prunable(model, patterns)
    with eval_mode(model):
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    removed: Dict[str, List[int]] = {}
    for name in names:
        conv = model.get_submodule(name)
        k = _n_remove(conv.out_channels, ratio)
        if k == 0:
            continue
        idxs = torch.argsort(l1_filter_norms(conv.weight), stable=True)[:k].sort().values.tolist()
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idxs)
        _refuse_tied(name, conv, group)
        group.prune()
        removed[name] = idxs
    return removed


def tp_global_prune_(model: nn.Module, ratio: float, patterns: Sequence[str], example_inputs: Tensor,
                     max_layer_ratio: float = 0.9) -> Dict[str, List[int]]:
    """Torch-Pruning's global group-magnitude pruning, in place: the filters of every conv
    matching ``patterns`` are scored by the L2 norm of their whole dependency group (the
    filter, its BatchNorm channel, the next conv's input channel), each layer's scores divided
    by their mean (``tp.importance.GroupMagnitudeImportance(p=2)``), ranked together, and the
    weakest ``ratio`` of them all is removed: layers lose different fractions.

    NOTE: as ``tp.pruner.MetaPruner(global_pruning=True)`` in one step, except that a layer
    loses at most ``max_layer_ratio`` of its filters (its strongest are kept); Torch-Pruning
    instead skips a layer whose every filter falls under the threshold, so that pruning more
    can leave a model larger.

    Returns ``{layer name: removed filter indices}``.
    """
    import torch_pruning as tp

    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    names = select_prunable(model, patterns)
    with eval_mode(model):
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    groups, scores = {}, []
    for name in names:
        conv = model.get_submodule(name)
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
        _refuse_tied(name, conv, group)
        groups[name] = conv
        scores.append(importance(group).detach().double().cpu())
    flat = torch.cat(scores)
    n_remove = int(round(ratio * len(flat)))
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    chosen[torch.argsort(flat, stable=True)[:n_remove]] = True
    removed: Dict[str, List[int]] = {}
    start = 0
    for name, score in zip(names, scores):
        mine = chosen[start:start + len(score)]
        start += len(score)
        cap = int(max_layer_ratio * len(score))
        idxs = torch.nonzero(mine).flatten()
        if len(idxs) > cap:  # keep the strongest of those chosen
            idxs = idxs[torch.argsort(score[idxs], stable=True)[:cap]]
        if len(idxs):
            idxs = idxs.sort().values.tolist()
            graph.get_pruning_group(groups[name], tp.prune_conv_out_channels, idxs=idxs).prune()
            removed[name] = idxs
    return removed


def _refuse_tied(name: str, conv: nn.Module, group) -> None:
    tied = [it.dep.target.module for it in group.items
            if it.dep.handler.__name__ == "prune_out_channels" and it.dep.target.module is not conv
            and isinstance(it.dep.target.module, (nn.Conv2d, nn.Linear))]
    if tied:
        raise ValueError(f"layer {name!r}: its filters are tied to other layers' outputs (a residual sum or "
                         f"concatenation); prune only layers whose output feeds one conv, e.g. '*.conv1'")


METHODS = ("l1", "tp-global")


def prune_to_macs(model: nn.Module, target_macs: float, patterns: Sequence[str], example_inputs: Tensor,
                  tol: float = 0.005, max_iter: int = 30, method: str = "l1") -> Tuple[nn.Module, float, Dict]:
    """The ratio whose pruned model has the most MACs within ``target_macs`` (bisection; it
    stops within ``tol`` under the target).

    ``method``: ``"l1"`` (:func:`l1_prune_`, the same fraction in every layer) or
    ``"tp-global"`` (:func:`tp_global_prune_`, one global fraction shared out by importance).
    Returns ``(pruned copy, ratio, removed filters)``; ``model`` is not changed. Raises
    ``ValueError`` when the target is out of reach (above the model's MACs, or below what
    pruning as far as the method goes gives).
    """
    import copy

    from .profile import profile

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    prune_ = l1_prune_ if method == "l1" else tp_global_prune_
    if (not isinstance(target_macs, (int, float)) or isinstance(target_macs, bool) or not math.isfinite(target_macs)
            or target_macs <= 0):
        raise ValueError(f"target MACs must be a finite number > 0, got {target_macs!r}")
    size = tuple(example_inputs.shape[1:])
    full = profile(model, size).macs

    def attempt(r: float):
        pruned = copy.deepcopy(model)
        removed = prune_(pruned, r, patterns, example_inputs)
        return pruned, profile(pruned, size).macs, removed

    if target_macs > full:
        raise ValueError(f"target MACs {target_macs:.4g} exceed the model's {full:.4g}: nothing to prune")
    smallest = attempt(0.999)
    if target_macs < smallest[1]:
        raise ValueError(f"target MACs {target_macs:.4g} are below {smallest[1]:.4g}, the MACs with the selected "
                         f"layers pruned as far as {method!r} goes; select more layers")
    lo, hi = 0.0, 0.999
    best = (smallest[0], 0.999, smallest[1], smallest[2])  # within the budget: the fallback
    for _ in range(max_iter):
        mid = (lo + hi) / 2
        pruned, macs, removed = attempt(mid)
        if best[2] < macs <= target_macs:
            best = (pruned, mid, macs, removed)
        if (1 - tol) * target_macs <= macs <= target_macs:
            break
        lo, hi = (mid, hi) if macs > target_macs else (lo, mid)
    return best[0], best[1], best[3]
