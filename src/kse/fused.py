"""The fused form of a KSE layer on the CPU (KSE, Li et al., CVPR 2019, Sec. 3.5 and Fig. 2).

A layer deployed ``"fused"`` runs the paper's split form, centroid convolution then channel
fusion, in one pass of the compiled operator ``kse::fused_conv`` (:mod:`kse.ops`, C++ in
``kse/csrc/fused_conv.cpp``). This module turns a :class:`kse.KSEConv2d` into the tensors the
operator reads (:func:`prepare`), says which layers it supports (:func:`supports`), and keeps
the entry points the layer and the command line use: :func:`available`, :func:`loaded`,
:func:`build_error`, :func:`library_path`, :func:`fused_conv` and, for training steps,
:func:`expand_weight` (one operator call per layer for W').

Stride 1, no dilation, float32 (other layers keep the stock forms). The extension is compiled on
first use (:func:`kse.ops.load_library`; a C++ compiler and ninja are needed, then it is cached);
``available()`` says whether it built. ``torch.jit.trace``, ``torch.export``, AOTInductor and
``torch.compile`` record the operator ``torch.ops.kse.fused_conv``: a saved TorchScript model or
AOTInductor package needs the library loaded to run (``kse.ops.load_library()``). Every index
the kernel reads is checked first.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import ops


_CHUNK_ROWS = 128  # centroid rows per chunk: 128 x 32 floats = 16 KiB of responses


def chunk_rows(out_channels: int) -> int:
    """Centroid rows per chunk of kept channels: at least 128 (their responses for one tile, 128
    bytes a row, stay in the L1 cache during the fusion), and 2 per output channel for wide
    layers. Each chunk reloads and stores the tile's N accumulators; from N = 128 on they no
    longer fit in L1 with the responses, and chunks of 2N rows (in L2) amortise that over more
    channels (compare with ``python benchmarks/kernel_ab.py --resnet50 --against-chunk-rows 128``)."""
    return max(_CHUNK_ROWS, 2 * out_channels)


def loaded() -> bool:
    """Whether the extension is already loaded (or known not to build) in this process: calling
    :func:`available` then costs nothing."""
    return ops.loaded()


def available() -> bool:
    """Whether the fused kernel is compiled and usable (builds it on first call)."""
    return ops.available()


def library_path() -> Optional[str]:
    """The compiled operator library (builds it on first call; ``None`` if it did not build).

    A TorchScript model or AOTInductor package exported with fused layers calls
    ``torch.ops.kse.fused_conv``: load this library first, with ``kse.ops.load_library()`` in
    Python or ``torch.ops.load_library(path)``."""
    return ops.library_path()


def build_error() -> Optional[str]:
    """Why the extension is unavailable (``None`` when it built)."""
    return ops.build_error()


def kernel_padding(layer) -> Optional[Tuple[int, int]]:
    """The layer's padding as the two numbers the kernel takes (``"valid"``: none; ``"same"``:
    half the dilated kernel on each side), or ``None`` where ``"same"`` pads one side more than
    the other."""
    if not isinstance(layer.padding, str):
        return tuple(layer.padding)
    if layer.padding == "valid":
        return 0, 0
    spans = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
    return None if any(s % 2 for s in spans) else (spans[0] // 2, spans[1] // 2)


def supports(layer) -> bool:
    """The layer shapes the kernel handles: stride 1, dilation 1, float32, at least one kept
    channel, the same padding on both sides of each axis (numbers, ``"valid"``, or ``"same"``
    with an odd kernel)."""
    return (tuple(layer.stride) == (1, 1) and tuple(layer.dilation) == (1, 1)
            and layer.centroids.dtype == torch.float32 and len(layer.kept_channels) > 0
            and kernel_padding(layer) is not None)


def prepare(layer, rows_per_chunk: Optional[int] = None) -> dict:
    """The index tensors the kernel reads, from a :class:`kse.KSEConv2d` (chunks of at most
    ``rows_per_chunk`` centroid rows; default :func:`chunk_rows`)."""
    counts = layer.centroid_counts.to(torch.int64)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0).to(torch.int32)
    kh, kw = layer.kernel_size
    scale, bias = layer.affine()  # outputs = scale * sum + bias (a folded BatchNorm, or 1 and the bias)
    relu = layer.epilogue is not None and layer.epilogue[2]
    starts, rows, limit = [0], 0, rows_per_chunk or chunk_rows(layer.out_channels)
    for c, q in enumerate(counts.tolist()):
        if rows and rows + q > limit:
            starts.append(c)
            rows = 0
        rows += q
    starts.append(len(counts))
    return {"kept": layer.kept_channels.to(torch.int64).cpu().contiguous(),
            "chunks": torch.tensor(starts, dtype=torch.int32),
            "cents": layer.centroids.detach().reshape(-1, kh * kw).float().contiguous(),
            "offsets": offsets.contiguous(),
            "assign": layer.assignment.t().to(torch.int32).contiguous(),
            "scale": scale.float().cpu().contiguous(), "bias": bias.float().cpu().contiguous(), "relu": relu}


def expand_weight(centroids: Tensor, rows: Tensor, channels_last: bool, disjoint: bool = False) -> Tensor:
    """``W'[n, j] = centroids[rows[n, j]]`` (zero where ``rows[n, j] < 0``) as a ``[N, J, kh,
    kw]`` tensor laid out ``channels_last`` or NCHW, differentiable in ``centroids`` (the gradient
    of a centroid is the sum of its kernels' gradients). ``centroids: [M, kh, kw]`` on the CPU,
    ``rows``: contiguous int32. One call of the operator ``kse::expand_weight`` and one autograd
    node (:func:`kse.ops.expand_weight`; stock operations where the extension is not built);
    the stock operations it replaces are :func:`kse.training_weight.gather_elements` and its views. With
    ``disjoint`` (only if no centroid row appears in two columns ``j``, as in a KSE layer, where
    every input channel has its own centroids) the backward reduces the columns in parallel."""
    return ops.expand_weight(centroids, rows, channels_last, disjoint)


def fused_conv(x: Tensor, tensors: dict, kernel_size, padding) -> Tensor:
    """Run the kernel on the tensors of :func:`prepare`: ``x: [B, C, H, W]`` float32 on the CPU ->
    ``[B, N, H', W']`` (:func:`kse.ops.fused_conv`; stock operations where the extension is not
    built)."""
    return ops.fused_conv(x, tensors["kept"], tensors["cents"], tensors["offsets"], tensors["assign"],
                          tensors["scale"], tensors["bias"], tensors["chunks"], kernel_size[0], kernel_size[1],
                          padding[0], padding[1], tensors["relu"])
