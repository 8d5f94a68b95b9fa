"""Stochastic weight averaging: the mean of a model's weights over the ends of several epochs.

Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization" (UAI 2018)
train on with a constant or cyclic learning rate and average the weights the run passes
through; the average lies nearer the centre of a wide, flat region of the loss than any one of
them and tends to generalise better. Its BatchNorm statistics belong to none of the averaged
models, so they are re-estimated on training data afterwards (``kse.recalibrate_bn_``).

After the ``n``-th averaged epoch, for every trainable parameter ``theta`` (any shape):

    mean_n = mean_{n-1} + (theta_n - mean_{n-1}) / n        mean_1 = theta_1

which is the plain mean ``(theta_1 + ... + theta_n) / n`` held in one tensor per parameter, in
float32 whatever the parameter's dtype. ``kse.train.fit`` does this with
``TrainConfig(swa_from=k)`` (``--swa-from K`` on ``kse train`` and ``kse finetune``).

    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> mean = {}
    >>> for step in range(3):
    ...     with torch.no_grad():
    ...         _ = net.weight.fill_(step)
    ...     accumulate_(mean, net, count=step)
    >>> mean["weight"].tolist()
    [[1.0, 1.0]]
    >>> load_average_(net, mean); net.weight.tolist()
    [[1.0, 1.0]]
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn


def averaged_parameters(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The parameters an average covers: the trainable ones, by name (frozen ones never move)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def accumulate_(average: Dict[str, torch.Tensor], model: nn.Module, count: int) -> None:
    """Fold ``model``'s current weights into ``average``, the mean of ``count`` earlier ones.

    ``average`` maps parameter names to float32 CPU tensors (empty when ``count`` is 0) and
    becomes the mean of ``count + 1`` weights, in place. Raises ``ValueError`` when ``count`` is
    not an integer >= 0, or when ``average`` does not hold exactly ``model``'s trainable
    parameters with their shapes (an average of another model)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an integer >= 0, got {count!r}")
    params = averaged_parameters(model)
    if count == 0:
        average.clear()
        average.update({name: p.detach().float().cpu().clone() for name, p in params.items()})
        return
    check_average(average, model)
    for name, p in params.items():
        mean = average[name]
        mean.add_(p.detach().float().cpu() - mean, alpha=1.0 / (count + 1))


@torch.no_grad()
def load_average_(model: nn.Module, average: Dict[str, torch.Tensor]) -> None:
    """Copy ``average`` into ``model``'s trainable parameters (each keeps its dtype and device).
    BatchNorm statistics are left as they are: re-estimate them next."""
    check_average(average, model)
    for name, p in averaged_parameters(model).items():
        p.copy_(average[name].to(device=p.device, dtype=p.dtype))


def check_average(average: Dict[str, torch.Tensor], model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``average`` holds one finite tensor of the right shape for
    every trainable parameter of ``model``, and nothing else."""
    params = averaged_parameters(model)
    missing, extra = sorted(set(params) - set(average)), sorted(set(average) - set(params))
    if missing or extra:
        raise ValueError(f"the weight average does not match the model: missing {missing[:3]}, unexpected "
                         f"{extra[:3]} (an average of another model); start the run again in a new folder")
    for name, p in params.items():
        mean = average[name]
        if tuple(mean.shape) != tuple(p.shape):
            raise ValueError(f"the weight average of {name} has shape {tuple(mean.shape)}, the model's "
                             f"parameter {tuple(p.shape)}; start the run again in a new folder")
        if not torch.isfinite(mean).all():
            raise ValueError(f"the weight average of {name} holds NaN or Inf; start the run again in a new folder")
