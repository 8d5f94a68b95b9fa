"""Remove output or input channels from a :class:`~kse.conv.KSEConv2d`, keeping its function
on what remains (:func:`kse.compress_` does, as it removes dead channels found by
:mod:`kse.dead_channels`).

A layer's centroids are the rows of ``centroids: Tensor[M, kh, kw]``; kernel n of kept channel
j is row ``assignment[j, n]``, so W'[n, j] = centroids[assignment[j, n]] (KSE Sec. 3.5):

* output channels: drop columns of ``assignment`` and the centroid rows no kernel uses any
  more; each kept channel's count becomes q'_c = |{assignment[j, n] : n kept}|;
* input channels: only channels the layer already skips (``q_c = 0``) go, so the kept
  channels are renumbered and nothing else changes.

Both return a copy in the layer's form and mode.
"""

from __future__ import annotations

from typing import Sequence

import torch


def remove_out_channels(layer, remove: Sequence[int]):
    """A copy of ``layer`` without output channels ``remove``; unused centroids are dropped."""
    keep_out = [n for n in range(layer.out_channels) if n not in set(remove)]
    assignment = layer.assignment[:, keep_out]
    used = torch.zeros(len(layer.centroids), dtype=torch.bool, device=assignment.device)
    used[assignment.flatten()] = True  # centroid rows still referenced, in order
    owner = torch.repeat_interleave(torch.arange(len(layer.kept_channels), device=assignment.device),
                                    layer.centroid_counts)
    counts = torch.bincount(owner[used], minlength=len(layer.kept_channels))
    copy = type(layer)(layer.in_channels, len(keep_out), layer.kernel_size, layer.stride, layer.padding,
                       layer.dilation, layer.bias is not None, layer.kept_channels.clone(), counts.cpu())
    copy = copy.to(layer.centroids.device, layer.centroids.dtype)
    with torch.no_grad():
        copy.centroids.copy_(layer.centroids[used])
        copy.assignment.copy_((torch.cumsum(used.long(), 0) - 1)[assignment])
        if layer.bias is not None:
            copy.bias.copy_(layer.bias[keep_out])
    return copy.set_form(layer.form).train(layer.training)


def remove_in_channels(layer, remove: Sequence[int]):
    """A copy of ``layer`` reading ``in_channels - len(remove)`` maps; every removed channel must
    be one the layer already skips (``q_c = 0``), so the function is unchanged."""
    remove_set = set(int(r) for r in remove)
    kept = layer.kept_channels.tolist()
    clash = remove_set.intersection(kept)
    if clash:
        raise ValueError(f"cannot remove input channels {sorted(clash)}: the layer still reads them")
    position = {c: i for i, c in enumerate(c for c in range(layer.in_channels) if c not in remove_set)}
    copy = type(layer)(len(position), layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                       layer.dilation, layer.bias is not None,
                       torch.tensor([position[c] for c in kept], dtype=torch.long), layer.centroid_counts.cpu().clone())
    copy = copy.to(layer.centroids.device, layer.centroids.dtype)
    copy.load_state_dict({**layer.state_dict(), "kept_channels": copy.kept_channels})
    return copy.set_form(layer.form).train(layer.training)
