"""Re-estimate BatchNorm running statistics after compression, without labels or gradients.

KSE (Li et al., CVPR 2019) replaces each kernel by its cluster centroid (Eq. 8 sets how many
centroids an input channel keeps) and prunes input channels whose indicator (Eq. 6) is low, all
without data. The weights change, so the activations' mean and variance change, but the
BatchNorm layers still hold the statistics of the dense model: a ResNet-56 compressed at G=4
classifies far worse until fine-tuning, mostly because of these stale statistics. Running the
compressed model on a few unlabeled training batches and recording each BatchNorm's input
statistics recovers most of the accuracy in seconds, before any training.

For every BatchNorm ``b`` with running statistics, after ``batches = K`` batches ``x_1..x_K``:

    running_mean_b = (1 / K) * sum_k mean(z_k)             z_k = input of b on batch x_k,
    running_var_b  = (1 / K) * sum_k var_unbiased(z_k)     per channel

which is PyTorch's cumulative average (``momentum=None``), as ``torch.optim.swa_utils.update_bn``.
During the passes each BatchNorm normalises with its batch's statistics (training mode); every
other module is in eval mode (Dropout off, KSE layers in their inference form).

    >>> import torch, kse
    >>> from kse.models import get_model
    >>> net = get_model("resnet20", num_classes=10, in_channels=1)
    >>> kse.compress_(net, kse.KSEConfig(G=4, input_size=(1, 16, 16)))
    >>> loader = [(torch.randn(8, 1, 16, 16), None) for _ in range(4)]
    >>> kse.recalibrate_bn_(net, loader, batches=4)
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> List[nn.Module]:
    """The BatchNorm modules of ``model`` that keep running statistics (those recalibration sets)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def _batch_input(batch, index: int) -> torch.Tensor:
    """The model input of one loader item: a tensor, or the first element of a tuple/list (labels ignored)."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"loader item {index} is a {type(batch).__name__}; recalibrate_bn_ needs a tensor batch "
                        "or an (inputs, labels) pair whose first element is a tensor")
    return batch


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, loader: Iterable, batches: int = 100) -> None:
    """Reset and re-estimate the running statistics of every BatchNorm of ``model`` in place.

    ``loader`` yields input tensors ``Tensor[B, ...]`` or ``(inputs, labels, ...)`` tuples (labels
    are ignored); its first ``batches`` items are run through the model without gradients, on the
    device of the model's parameters. Use training images without augmentation, in a fixed order
    for a reproducible result. Each BatchNorm's momentum and every module's train/eval mode are
    restored afterwards.

    Raises ``ValueError`` when ``batches`` is not an integer >= 1, when ``model`` has no BatchNorm
    with running statistics (nothing to recalibrate: a folded model, or one built without
    BatchNorm), or when ``loader`` has fewer than ``batches`` batches; in the last case, and on
    any error during the passes, the previous statistics are put back.
    """
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be an integer >= 1, got {batches!r}")
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running statistics, so there is "
                         "nothing to recalibrate (recalibrate before kse.fold_batchnorm, which folds them away)")
    try:
        available = len(loader)  # type: ignore[arg-type]
    except TypeError:
        available = None
    if available is not None and available < batches:
        raise ValueError(f"the loader has {available} batches, fewer than the {batches} asked for; "
                         f"pass batches <= {available} or a loader with more data")
    device = layers[0].running_mean.device
    modes: Dict[nn.Module, bool] = {m: m.training for m in model.modules()}  # pre-order: parents first
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(),
              None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in layers]
    done = False
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average of the batch statistics
            m.train()
        seen = 0
        for seen, batch in enumerate(loader, 1):
            model(_batch_input(batch, seen - 1).to(device))
            if seen == batches:
                break
        if seen < batches:
            raise ValueError(f"the loader has {seen} batches, fewer than the {batches} asked for; "
                             f"pass batches <= {seen} or a loader with more data")
        done = True
    finally:
        for m, (momentum, mean, var, count) in zip(layers, saved):
            m.momentum = momentum
            if not done:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                if count is not None:
                    m.num_batches_tracked.copy_(count)
        # one call for the whole model, then (pre-order, parents first) each module whose mode
        # still differs: a uniform model costs one train()/eval() call
        model.train(modes[model])
        for m, training in modes.items():
            if m.training != training:
                m.train(training)


def calibration_loader(dataset: str, data_dir: Optional[str] = None, batch_size: int = 128, seed: int = 0,
                       fake_size: int = 256, input_size: Optional[int] = None):
    """A ``DataLoader`` over the training split of ``dataset`` for :func:`recalibrate_bn_`: no
    augmentation (the statistics should be those of the images the model will see), in one
    fixed random order (a generator seeded with ``seed``), so that every model recalibrated
    with the same arguments sees the same images. Returns ``(loader, DatasetInfo)``."""
    from torch.utils.data import DataLoader

    from .data import get_dataset

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    ds, info = get_dataset(dataset, data_dir, train=True, fake_size=fake_size, input_size=input_size, augment=False)
    order = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size, shuffle=True, generator=order), info
