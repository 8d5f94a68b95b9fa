"""W' from the centroids in a training step (KSE Sec. 3.4-3.5, fine-tuning).

For each kept input channel c the N kernels are q_c shared centroids ``B_c``; kernel n of
channel c is centroid ``idx_c[n]``:

    W'[n, c] = B_c[idx_c[n]]          (Tensor[N, C_kept, kh, kw], or [N, C, kh, kw] with zero
                                       kernels for the dropped channels)

A layer's centroids are the rows of one table ``centroids: Tensor[M, kh, kw]`` (M = sum_c q_c)
and ``assignment: LongTensor[C_kept, N]`` holds the row of each kernel. Centroids are trainable
and assignments frozen, so the gradient of a centroid is the sum of the gradients of the kernels
assigned to it:

    dL/dB_c[q] = sum_{n : idx_c[n] = q} dL/dW'[n, c]

:func:`expand_centroids` builds W' on every call, with the compiled
:func:`kse.fused.expand_weight` on the CPU or with stock operations (:func:`gather_elements`);
:class:`WeightIndex` holds the index tensors it reads, made once per layer.
:func:`records_gradients` tells when an eval-mode call runs this training form too.
:func:`configure_training` switches the fast paths for the process.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor

from . import fused

# Above this fraction of kept input channels, a training step convolves all input channels (zero
# kernels for the dropped ones) instead of gathering the kept ones (benchmarks/train_step.py
# --select-max-kept compares); set with configure_training
_SELECT_MAX_KEPT = 2 / 3

# Build W' with the compiled extension where it applies (CPU); False: always with stock
# operations (benchmarks/train_step.py --stock-weight compares the two)
_EXPAND_EXTENSION = True


def configure_training(extension: Optional[bool] = None, select_max_kept: Optional[float] = None) -> Dict:
    """Switch the training forward's fast paths for the process; returns the previous settings.

    Args:
        extension: build W' with the compiled :func:`kse.fused.expand_weight` on the CPU (the
            default), or with stock operations (:func:`gather_elements`).
        select_max_kept: fraction of kept input channels above which a training step convolves
            all input channels (zero kernels for the dropped ones) rather than gathering the kept ones.
    """
    global _EXPAND_EXTENSION, _SELECT_MAX_KEPT
    before = {"extension": _EXPAND_EXTENSION, "select_max_kept": _SELECT_MAX_KEPT}
    if extension is not None:
        _EXPAND_EXTENSION = bool(extension)
    if select_max_kept is not None:
        if not 0 <= select_max_kept <= 1:
            raise ValueError(f"select_max_kept must be a fraction in [0, 1], got {select_max_kept!r}")
        _SELECT_MAX_KEPT = float(select_max_kept)
    return before


def convolves_all(kept: int, in_channels: int) -> bool:
    """Whether a training step convolves all ``in_channels`` input channels (zero kernels for the
    dropped) rather than gathering the ``kept`` ones: with few dropped (the gather costs more than
    it saves) or none kept."""
    return kept == 0 or kept > _SELECT_MAX_KEPT * in_channels


def _plain_autograd() -> bool:
    """Eager reverse-mode autograd only, which the extension's C++ autograd node supports: no
    ``torch.func`` transform (grad, vmap, jacrev), no forward-mode AD level, no tracing or
    compiling."""
    return not (torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0
                or torch.jit.is_tracing() or torch.compiler.is_compiling())


def records_gradients(x: Tensor, centroids: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether an eval-mode call must run the training form: autograd records it (the input or
    a parameter requires a gradient: saliency maps, fine-tuning with BatchNorm frozen), or a
    ``torch.func`` transform or forward-mode AD is active. Not while ``torch.jit.trace`` or
    ``torch.export`` record the model: the export keeps the inference form."""
    if torch.is_grad_enabled() and not (torch.jit.is_tracing() or torch.compiler.is_exporting()):
        if x.requires_grad or centroids.requires_grad or (bias is not None and bias.requires_grad):
            return True
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def gather_elements(rows: Tensor, index: Tensor) -> Tensor:
    """``out = cat([rows, 0]).flatten()[index]``: the elements of W' from the centroids (the
    appended row of zeros serves the kernels of dropped channels).

    ``index`` addresses single elements, so W' comes out in the memory order the convolution
    wants (channels_last for channels_last inputs). Backward (autograd of ``index_select``):
    ``index_add`` into zeros, so the gradient of a centroid is the sum of the gradients of its
    kernels. Stock operations: the form used off the CPU or without the compiled extension, and
    the reference for :func:`kse.fused.expand_weight`."""
    return F.pad(rows, (0, 0, 0, 1)).reshape(-1).index_select(0, index)


def kernel_rows(assignment: Tensor, kept: Tensor, in_channels: int, full: bool) -> Tensor:
    """The centroid row of each kernel of W', ``LongTensor[N, C_kept]`` (with ``full``, ``[N, C]``
    with -1 for the dropped channels)."""
    rows = assignment.t()
    if not full:
        return rows
    return torch.full((assignment.shape[1], in_channels), -1, dtype=torch.long,
                      device=rows.device).index_copy_(1, kept, rows)


def rows_are_disjoint(rows: Tensor, table_rows: int) -> bool:
    """Whether no centroid row serves two input channels (columns) of ``rows``: true for a KSE
    layer, whose channels have their own centroids; then :func:`kse.fused.expand_weight` reduces
    its backward in parallel."""
    used = rows >= 0  # give every row the column of one of its users; all agree iff none is shared
    cols = torch.arange(rows.shape[1], device=rows.device).expand_as(rows)[used]
    owner = torch.full((table_rows,), -1, dtype=torch.long, device=rows.device).index_put_((rows[used],), cols)
    return bool((owner[rows[used]] == cols).all())


def element_index(rows: Tensor, table_rows: int, taps: int, channels_last: bool) -> Tensor:
    """For every element of W', its position in the flattened ``[table_rows + 1, taps]`` table
    of centroids plus a zero row (for the dropped channels, ``rows < 0``), in NCHW or
    ``channels_last`` order: the ``index`` of :func:`gather_elements`."""
    rows = torch.where(rows < 0, table_rows, rows)
    steps = torch.arange(taps, device=rows.device)
    index = rows.unsqueeze(1) * taps + steps.view(1, taps, 1) if channels_last else rows.unsqueeze(2) * taps + steps
    return index.reshape(-1).contiguous()


class WeightIndex:
    """The index tensors that build W' from the centroids in training, for one layer's
    ``assignment`` and ``kept_channels`` buffers, made on first use. An in-place edit of those
    buffers needs :meth:`KSEConv2d.refresh`; a new buffer is noticed (:meth:`made_from`)."""

    def __init__(self, assignment: Tensor, kept: Tensor, in_channels: int, table_rows: int, kernel_size) -> None:
        self.assignment, self.kept, self.in_channels, self.table_rows = assignment, kept, in_channels, table_rows
        self.kernel_size = tuple(kernel_size)
        self.taps = kernel_size[0] * kernel_size[1]
        self._made: Dict[tuple, object] = {}

    def made_from(self, assignment: Tensor, kept: Tensor, table_rows: int) -> bool:
        return assignment is self.assignment and kept is self.kept and table_rows == self.table_rows

    def _get(self, key: tuple, make):
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def rows(self, full: bool) -> Tensor:
        """:func:`kernel_rows` in int32, for :func:`kse.fused.expand_weight`."""
        return self._get(("rows", full), lambda: kernel_rows(self.assignment, self.kept, self.in_channels, full)
                         .to(torch.int32).contiguous())

    def disjoint(self, full: bool) -> bool:
        return self._get(("disjoint", full), lambda: rows_are_disjoint(
            kernel_rows(self.assignment, self.kept, self.in_channels, full), self.table_rows))

    def elements(self, full: bool, channels_last: bool) -> Tensor:
        return self._get(("elements", full, channels_last), lambda: element_index(
            kernel_rows(self.assignment, self.kept, self.in_channels, full), self.table_rows, self.taps, channels_last))


def expand_centroids(centroids: Tensor, index: WeightIndex, full: bool, channels_last: bool = False) -> Tensor:
    """``W'[n, j] = centroids[rows[n, j]]``: ``Tensor[N, C_kept, kh, kw]`` (with ``full``, ``[N, C,
    kh, kw]``, zero kernels for the dropped channels), laid out ``channels_last`` or NCHW, from
    ``centroids: Tensor[M, kh, kw]`` and the ``index`` of the layer's assignment. Recorded by
    autograd on the CPU: the compiled :func:`kse.fused.expand_weight`; otherwise (and as its
    reference) :func:`gather_elements`."""
    if (_EXPAND_EXTENSION and centroids.is_cpu and centroids.requires_grad and torch.is_grad_enabled()
            and _plain_autograd() and fused.available()):
        return fused.expand_weight(centroids, index.rows(full), channels_last, index.disjoint(full))
    kh, kw = index.kernel_size
    weight = gather_elements(centroids.reshape(-1, kh * kw), index.elements(full, channels_last))
    out_channels = index.assignment.shape[1]
    return (weight.view(out_channels, kh, kw, -1).permute(0, 3, 1, 2) if channels_last
            else weight.view(out_channels, -1, kh, kw))
