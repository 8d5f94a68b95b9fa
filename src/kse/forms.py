"""Inference forms of a KSE layer (KSE Sec. 3.5, Fig. 2): a registry of ``prepare`` / ``run`` pairs.

A :class:`~kse.conv.KSEConv2d` with kept input channels ``kept``, centroids ``B`` and
assignment ``a`` computes, for each output channel n,

    y[n] = s[n] * (sum_j conv(x[kept[j]], B[a[j, n]]) + bias[n]) + t[n]     (then ReLU, if asked)

where ``(s, t, relu)`` is the layer's epilogue (a folded BatchNorm, see
:meth:`KSEConv2d.set_epilogue`; 1, 0 and no ReLU otherwise). Every form computes this function
from tensors prepared once from the layer; ``REGISTRY[name]`` holds the pair

* ``prepare(layer) -> tensors`` (a dict of tensors and the few numbers ``run`` needs), and
* ``run(tensors, x) -> y``, which does not see the layer,

plus ``unsupported(layer)`` (why the form cannot run a layer, or ``None``) and
``memory(layer, shape)`` (an estimate of the bytes ``prepare`` and ``run`` allocate for an input
of that shape, which lets ``deploy_(form="auto")`` skip out-of-proportion candidates):

* ``"dense"``: ``W'[n, j] = B[a[j, n]]`` (``Tensor[N, C_kept, kh, kw]``), one convolution of the
  gathered kept input channels;
* ``"full"``: the same weight zero-filled over all input channels, one convolution of the whole
  input: the cost of the original convolution;
* ``"split"``: the paper's deployment (Fig. 2): convolve each kept input map with its q_c
  centroids (a grouped convolution per bucket of channels with equal q), then "channel fusion":
  output n sums the maps of its centroids, through a 0/1 matrix ``[N, M]``, dense where small
  and sparse (CSR, ``N * C_kept`` ones) where a dense one would be large;
* ``"fused"``: the split form in one pass of the compiled CPU kernel (:mod:`kse.fused`).

:func:`prepare` is the one place that turns a layer's form string (``"dense"``, or a form per
batch size such as ``"fused@1,full@64"``, or ``"train"``) into the callable its eval-mode
forward runs. ``"train"`` (not deployed) runs :func:`default_form`: ``"full"``, or ``"dense"``
where the layer reads at most :data:`DEFAULT_GATHER_MAX_KEPT` of its input channels, a choice
made without measuring.

Example::

    >>> import torch, torch.nn as nn
    >>> from kse import forms
    >>> from kse.conv import KSEConv2d
    >>> layer = KSEConv2d.from_conv(nn.Conv2d(4, 8, 3, padding=1), torch.tensor([0, 2, 8, 4]))
    >>> run = forms.prepare(layer, "split")
    >>> run(torch.randn(1, 4, 5, 5)).shape
    torch.Size([1, 8, 5, 5])
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fused
from .kmeans import centroid_offsets

Tensors = Dict[str, Any]

# Eval-mode default of a layer that was not deployed: gather the kept input channels ("dense")
# when the layer reads at most this fraction of them, else convolve them all ("full", the
# original convolution's cost); the same rule as the training forward's
DEFAULT_GATHER_MAX_KEPT = 2 / 3

# "split": the fusion matrix is dense when it has at most this many times the elements of the
# dense weight W', or at most DENSE_FUSION_MAX_ELEMENTS; else sparse
DENSE_FUSION_MAX_RATIO = 4
DENSE_FUSION_MAX_ELEMENTS = 2 ** 18


# ----------------------------------------------------------------------------- shared pieces
def is_channels_last(x: Tensor) -> bool:
    """A 4-D tensor laid out channels_last (and not also plain contiguous, as 1x1 maps are)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def select_channels(x: Tensor, kept: Optional[Tensor]) -> Tensor:
    """``x[:, kept]`` (``kept=None``: all of them), keeping a channels_last input channels_last:
    an NCHW result would switch every following layer to the slower layout."""
    if kept is None:
        return x
    if is_channels_last(x):
        # along the contiguous channel dim of the NHWC view, gather (forward and backward) is several
        # times faster than index_select (benchmarks/gather.py)
        nhwc = x.permute(0, 2, 3, 1)
        return torch.gather(nhwc, 3, kept.view(1, 1, 1, -1).expand(*nhwc.shape[:3], -1)).permute(0, 3, 1, 2)
    return x.index_select(1, kept)


def _kept_or_none(layer) -> Optional[Tensor]:
    return None if len(layer.kept_channels) == layer.in_channels else layer.kept_channels


def affine_output(out: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], relu: bool) -> Tensor:
    """``relu?(scale * out + bias)`` per output channel (``None``: 1, resp. 0)."""
    if scale is not None:
        out = out * scale.view(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return F.relu(out) if relu else out


def epilogue(scale: Tensor, shift: Optional[Tensor], relu: bool, out_channels: int,
             like: Tensor) -> Tuple[Tensor, Tensor, bool]:
    """``(scale, shift, relu)`` for :meth:`KSEConv2d.set_epilogue`: one value per output channel
    (``shift`` default 0), detached, on ``like``'s device and in its dtype."""
    scale = torch.as_tensor(scale).detach().reshape(-1)
    shift = torch.zeros(out_channels) if shift is None else torch.as_tensor(shift).detach().reshape(-1)
    if len(scale) != out_channels or len(shift) != out_channels:
        raise ValueError(f"scale and shift need {out_channels} values (one per output channel), "
                         f"got {len(scale)} and {len(shift)}")
    return scale.to(like.device, like.dtype), shift.to(like.device, like.dtype), bool(relu)


def _epilogue_tensors(layer) -> Tuple[Optional[Tensor], Optional[Tensor], bool]:
    """``(scale or None, bias or None, relu)`` of the layer's output ``scale * conv + bias``."""
    if layer.epilogue is None:
        return None, (layer.bias.detach().clone() if layer.bias is not None else None), False
    scale, bias = layer.affine()
    return scale, bias, layer.epilogue[2]


def _out_size(layer, H: int, W: int) -> Tuple[int, int]:
    if layer.padding == "same":
        return H, W
    pad = (0, 0) if layer.padding == "valid" else layer.padding
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
                 zip((H, W), pad, layer.dilation, layer.kernel_size, layer.stride))


def _sizes(layer, shape: Sequence[int]) -> Tuple[int, ...]:
    """``(B, N, K, M, taps, H * W, H' * W', bytes per element)`` for an input of ``shape``."""
    B, _, H, W = shape
    Ho, Wo = _out_size(layer, H, W)
    kh, kw = layer.kernel_size
    return (B, layer.out_channels, len(layer.kept_channels), len(layer.centroids), kh * kw, H * W,
            max(Ho, 0) * max(Wo, 0), layer.centroids.element_size())


# ----------------------------------------------------------------------------- dense and full
def _conv_tensors(layer, weight: Tensor, kept: Optional[Tensor]) -> Tensors:
    scale, bias, relu = _epilogue_tensors(layer)
    if scale is not None:  # y = s * conv(x) + t, folded into the weight
        weight = weight * scale.view(-1, 1, 1, 1)
    return {"weight": weight.contiguous(), "bias": bias, "kept": kept, "relu": relu,
            "conv": (layer.stride, layer.padding, layer.dilation)}


def prepare_dense(layer) -> Tensors:
    return _conv_tensors(layer, layer.clustered_weight().detach(), _kept_or_none(layer))


def prepare_full(layer) -> Tensors:
    return _conv_tensors(layer, layer.to_conv().weight.detach(), None)


def run_conv(t: Tensors, x: Tensor) -> Tensor:
    """``"dense"`` and ``"full"``: one convolution with the cached weight (epilogue folded in).

    The weight follows the input's memory layout, as ``model.to(memory_format=...)`` lays out an
    ``nn.Conv2d``'s: a convolution whose weight is laid out otherwise reorders it on every call.
    It is converted on the first call in the other layout and kept (not while compiling)."""
    weight = t["weight"]
    layout = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    if not weight.is_contiguous(memory_format=layout) and not torch.compiler.is_compiling():
        weight = t["weight"] = weight.contiguous(memory_format=layout)
    out = F.conv2d(select_channels(x, t["kept"]), weight, t["bias"], *t["conv"])
    return F.relu(out) if t["relu"] else out


def memory_dense(layer, shape) -> int:
    B, N, K, M, taps, hw, out_hw, e = _sizes(layer, shape)
    return e * (N * K * taps + N + B * K * hw + B * N * out_hw) + 8 * K


def memory_full(layer, shape) -> int:
    B, N, K, M, taps, hw, out_hw, e = _sizes(layer, shape)
    return e * (N * layer.in_channels * taps + N + B * N * out_hw)


# ----------------------------------------------------------------------------- split (Fig. 2)
def _dense_fusion(layer) -> bool:
    N, K, M = layer.out_channels, len(layer.kept_channels), len(layer.centroids)
    kh, kw = layer.kernel_size
    return N * M <= max(DENSE_FUSION_MAX_RATIO * N * K * kh * kw, DENSE_FUSION_MAX_ELEMENTS)


def prepare_split(layer) -> Tensors:
    counts = layer.centroid_counts.cpu()
    offsets = centroid_offsets(counts)
    kh, kw = layer.kernel_size
    device, dtype = layer.centroids.device, layer.centroids.dtype
    buckets, new_row, start = [], torch.empty(int(counts.sum()), dtype=torch.long), 0
    for q in torch.unique(counts).tolist():  # one grouped convolution per bucket of equal q
        pos = torch.nonzero(counts == q).flatten()
        rows = (offsets[pos].unsqueeze(1) + torch.arange(q)).flatten()
        new_row[rows] = torch.arange(start, start + len(rows))
        start += len(rows)
        weight = layer.centroids.detach()[rows.to(device)].reshape(len(rows), 1, kh, kw).contiguous()
        buckets.append((None if len(pos) == len(counts) else pos.to(device), weight))
    N, K = layer.out_channels, len(counts)
    rows_by_n = new_row[layer.assignment.cpu()].t()  # [N, K]: centroid (bucket order) of each kernel
    if _dense_fusion(layer):  # fusion[n, m] = 1 when output n sums the map of centroid m: a 1x1 conv
        fusion = torch.zeros(N, start, dtype=dtype).scatter_(1, rows_by_n, 1.0).view(N, start, 1, 1).to(device)
    else:  # N * K ones in CSR, never the dense [N, M] matrix
        sparse_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the operations used here are not
            warnings.simplefilter("ignore", UserWarning)
            fusion = torch.sparse_csr_tensor(torch.arange(0, N * K + 1, K), rows_by_n.sort(1).values.flatten(),
                                             torch.ones(N * K, dtype=sparse_dtype), (N, start),
                                             check_invariants=False).to(device)
    scale, bias, relu = _epilogue_tensors(layer)
    return {"kept": _kept_or_none(layer), "buckets": buckets, "fusion": fusion, "scale": scale, "bias": bias,
            "relu": relu, "conv": (layer.stride, layer.padding, layer.dilation)}


def run_split(t: Tensors, x: Tensor) -> Tensor:
    """Per-channel centroid convolutions, then channel fusion by the 0/1 matrix."""
    xs = select_channels(x, t["kept"])
    maps = []
    for chans, weight in t["buckets"]:
        xb = xs.index_select(1, chans) if chans is not None else xs
        maps.append(F.conv2d(xb, weight, None, *t["conv"], groups=xb.shape[1]))
    maps = torch.cat(maps, 1) if len(maps) > 1 else maps[0]  # [B, M, H', W'], bucket order
    fusion = t["fusion"]
    if fusion.layout == torch.strided:
        out = F.conv2d(maps, fusion)
    else:  # [N, M] @ [M, B * H' * W']
        B, M, H, W = maps.shape
        flat = maps.transpose(0, 1).reshape(M, B * H * W).to(fusion.dtype)
        out = (fusion @ flat).view(-1, B, H, W).transpose(0, 1).to(x.dtype).contiguous()
    return affine_output(out, t["scale"], t["bias"], t["relu"])


def memory_split(layer, shape) -> int:
    B, N, K, M, taps, hw, out_hw, e = _sizes(layer, shape)
    fusion = e * N * M if _dense_fusion(layer) else N * K * (8 + e) + 8 * (N + 1) + e * B * M * out_hw
    return e * (M * taps + 2 * N + B * K * hw + B * M * out_hw + B * N * out_hw) + 16 * K + fusion


# ----------------------------------------------------------------------------- fused (kse.fused)
def prepare_fused(layer) -> Tensors:
    t = dict(fused.prepare(layer))
    t["cents"] = t["cents"].clone()  # a copy, as the other forms' tensors: in-place edits need a refresh
    t["geometry"] = (tuple(layer.kernel_size), fused.kernel_padding(layer))
    t["fallback"] = prepare_dense(layer) if layer.centroids.device.type != "cpu" else None
    return t


def run_fused(t: Tensors, x: Tensor) -> Tensor:
    """The compiled kernel for float32 inputs on the CPU; otherwise (another device, or a dtype
    such as autocast's bfloat16) a dense convolution with the same weights."""
    if t["fallback"] is not None:
        return run_conv(t["fallback"], x)
    if x.is_cpu and x.dtype == torch.float32:
        return fused.fused_conv(x, t, *t["geometry"])
    (kh, kw), padding = t["geometry"]
    N, K = t["assign"].shape
    weight = t["cents"][t["assign"].long()].view(N, K, kh, kw) * t["scale"].view(-1, 1, 1, 1)
    out = F.conv2d(x.index_select(1, t["kept"]), weight.to(x.dtype), t["bias"].to(x.dtype), 1, padding)
    return F.relu(out) if t["relu"] else out


def unsupported_fused(layer) -> Optional[str]:
    if not fused.supports(layer):
        return ("the fused form needs stride 1, dilation 1, float32 centroids, a kept channel and equal padding "
                f"on both sides; this layer has stride {tuple(layer.stride)}, dilation {tuple(layer.dilation)}, "
                f"padding {layer.padding!r}, {layer.centroids.dtype}, {len(layer.kept_channels)} kept channels")
    if not fused.available():
        return f"the fused KSE kernel could not be built ({fused.build_error()})"
    return None


def memory_fused(layer, shape) -> int:
    B, N, K, M, taps, hw, out_hw, e = _sizes(layer, shape)
    return 4 * (M * taps + N * K + 2 * N + B * N * out_hw) + 16 * K + 8


# ----------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Form:
    """An inference form: how to prepare its tensors from a layer and run them on an input."""

    prepare: Callable[[Any], Tensors]
    run: Callable[[Tensors, Tensor], Tensor]
    memory: Callable[[Any, Sequence[int]], int]
    unsupported: Callable[[Any], Optional[str]] = lambda layer: None


REGISTRY: Dict[str, Form] = {
    "dense": Form(prepare_dense, run_conv, memory_dense),
    "full": Form(prepare_full, run_conv, memory_full),
    "split": Form(prepare_split, run_split, memory_split),
    "fused": Form(prepare_fused, run_fused, memory_fused, unsupported_fused),
}
FORMS = ("train",) + tuple(REGISTRY)  # "train": not deployed (see default_form)
INFERENCE_FORMS = ("dense", "full", "split")  # what deploy_(form="auto") measures by default


def parse_form(form: str) -> List[Tuple[int, str]]:
    """``"dense"`` -> ``[(1, "dense")]``; ``"fused@1,full@64"`` -> ``[(1, "fused"), (64, "full")]``
    (a form per batch size: inference forms, batch sizes increasing)."""
    if not isinstance(form, str):
        raise ValueError(f"form must be a string, got {type(form).__name__}")
    if "@" not in form:
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS} or per batch size like 'fused@1,full@64', got {form!r}")
        return [(1, form)]
    entries = []
    for part in form.split(","):
        name, _, size = part.strip().partition("@")
        if name not in REGISTRY or not size.isdigit() or int(size) < 1:
            raise ValueError(f"form {form!r}: each part must be an inference form {tuple(REGISTRY)} and a batch "
                             f"size, like 'fused@1,full@64'; got {part!r}")
        entries.append((int(size), name))
    if any(b1 <= b0 for (b0, _), (b1, _) in zip(entries, entries[1:])):
        raise ValueError(f"form {form!r}: batch sizes must increase")
    return entries


def batch_form(choices: Sequence[Tuple[int, str]]) -> str:
    """The form string for ``[(batch, form), ...]``: one form if all agree, else a form per size."""
    choices = sorted(choices)
    if len({f for _, f in choices}) == 1:
        return choices[0][1]
    return ",".join(f"{f}@{b}" for b, f in choices)


def without_fused(form: str, replacement: str = "dense") -> str:
    """``form`` with the compiled kernel replaced by ``replacement`` (``replacement`` alone if
    ``form`` is unreadable)."""
    try:
        return batch_form([(b, replacement if f == "fused" else f) for b, f in parse_form(form)])
    except ValueError:
        return replacement


def supported_form(layer) -> str:
    """``layer.form``, with :func:`without_fused` and a RuntimeWarning where the layer no longer
    suits the compiled kernel (e.g. after ``.half()``: the kernel is float32 only)."""
    if "fused" not in layer.form or fused.supports(layer):
        return layer.form
    form = without_fused(layer.form)
    warnings.warn(f"KSEConv2d: the fused form needs float32 centroids; {layer.centroids.dtype} "
                  f"layers use {form!r} instead", RuntimeWarning, stacklevel=3)
    return form


def default_form(layer) -> str:
    """The eval-mode form of a layer that was not deployed, chosen without measuring: ``"dense"``
    where it reads at most :data:`DEFAULT_GATHER_MAX_KEPT` of its input channels (the gather costs
    less than the convolutions it saves), else ``"full"`` (never slower than the original)."""
    kept = len(layer.kept_channels)
    return "dense" if 0 < kept <= DEFAULT_GATHER_MAX_KEPT * layer.in_channels else "full"


def resolve(layer, form: str) -> List[Tuple[int, str]]:
    """The inference forms ``layer`` runs for ``form``, per batch size (a ValueError naming the
    problem where one cannot run it)."""
    entries = [(b, default_form(layer) if f == "train" else f) for b, f in parse_form(form)]
    if len(layer.kept_channels) == 0:  # F.conv2d over zero input channels answers zero outputs
        entries = [(b, "full" if f in ("dense", "split") else f) for b, f in entries]
    for _, f in entries:
        reason = REGISTRY[f].unsupported(layer)
        if reason is not None:
            raise ValueError(reason)
    return entries


def form_at(entries: Sequence[Tuple[int, str]], batch: int) -> str:
    """The form measured at the batch size nearest to ``batch`` (geometrically)."""
    for (b0, f0), (b1, _) in zip(entries, entries[1:]):
        if batch * batch <= b0 * b1:
            return f0
    return entries[-1][1]


class _ByBatch:
    """Runs each input in the form given for the nearest listed batch size (geometrically)."""

    def __init__(self, limits: List[int], runs: List[Callable[[Tensor], Tensor]]) -> None:
        self.limits, self.runs = limits, runs

    def __call__(self, x: Tensor) -> Tensor:
        squared = x.shape[0] * x.shape[0]
        for limit, run in zip(self.limits, self.runs):
            if squared <= limit:
                return run(x)
        return self.runs[-1](x)


def prepare(layer, form: str) -> Callable[[Tensor], Tensor]:
    """The callable ``layer`` runs in eval mode for ``form``: each form's tensors prepared once."""
    entries = resolve(layer, form)
    with torch.no_grad():
        prepared = {f: REGISTRY[f].prepare(layer) for f in dict.fromkeys(f for _, f in entries)}
    runs = [functools.partial(REGISTRY[f].run, prepared[f]) for _, f in entries]
    if len(runs) == 1:
        return runs[0]
    return _ByBatch([b0 * b1 for (b0, _), (b1, _) in zip(entries, entries[1:])], runs)
