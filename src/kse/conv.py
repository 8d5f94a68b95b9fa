"""``KSEConv2d``: a convolution whose kernels are shared centroids (KSE Sec. 3.4-3.5).

For each kept input channel c (``q_c > 0``) the N kernels ``W[:, c]`` are replaced by q_c
centroids ``B_c``; kernel n uses centroid ``idx_c[n]``:

    W'[n, c] = B_c[idx_c[n]]          (Tensor[N, C_kept, kh, kw])

Input channels with ``q_c = 0`` are skipped. Centroids are trainable and assignments frozen, so
the gradient of a centroid is the sum of the gradients of the kernels assigned to it (Sec. 3.4,
fine-tuning). All centroids of a layer live in one parameter ``centroids: Tensor[M, kh, kw]``
(M = sum_c q_c); ``assignment: LongTensor[C_kept, N]`` holds, for each kept channel and output,
the row of its centroid.

In training mode, and in eval mode where autograd records the call, the layer rebuilds W' from
the centroids on every call (the training form). In eval mode without gradients it runs an
inference form (:mod:`kse.forms`) from tensors prepared once: a cached dense weight
(:func:`kse.forms.default_form`) unless :meth:`KSEConv2d.set_form` / :func:`kse.deploy_` chose
another. They are prepared on ``eval()`` and rebuilt by ``train()``/``eval()``,
:meth:`~KSEConv2d.set_form`, ``load_state_dict``, ``.to()`` and after a call that recorded
gradients; after editing parameters or buffers in place in eval mode otherwise, call
:meth:`KSEConv2d.refresh`.

Example::

    >>> import torch, torch.nn as nn
    >>> from kse.conv import KSEConv2d
    >>> conv = nn.Conv2d(8, 16, 3, padding=1)
    >>> counts = torch.tensor([0, 1, 2, 4, 4, 8, 16, 16])
    >>> layer = KSEConv2d.from_conv(conv, counts)
    >>> layer(torch.randn(2, 8, 10, 10)).shape
    torch.Size([2, 16, 10, 10])
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import forms, fused
from .forms import FORMS, INFERENCE_FORMS, batch_form, is_channels_last, parse_form, without_fused  # noqa: F401
from .kmeans import centroid_offsets, cluster_kernels, cluster_many  # noqa: F401 (kse.conv's names before)

# Above this fraction of kept input channels, a training step convolves all input channels (zero
# kernels for the dropped ones) instead of gathering the kept ones (benchmarks/train_step.py
# --select-max-kept compares); set with configure_training
_TRAIN_SELECT_MAX_KEPT = 2 / 3

# Build W' in training with the compiled extension where it applies (CPU); False: always with
# stock operations (benchmarks/train_step.py --stock-weight compares the two)
_TRAIN_EXPAND_EXTENSION = True


def configure_training(extension: Optional[bool] = None, select_max_kept: Optional[float] = None) -> Dict:
    """Switch the training forward's fast paths for the process; returns the previous settings.

    Args:
        extension: build W' with the compiled :func:`kse.fused.expand_weight` on the CPU (the
            default), or with stock operations (:func:`gather_elements`).
        select_max_kept: fraction of kept input channels above which a training step convolves
            all input channels (zero kernels for the dropped ones) rather than gathering the kept ones.
    """
    global _TRAIN_EXPAND_EXTENSION, _TRAIN_SELECT_MAX_KEPT
    before = {"extension": _TRAIN_EXPAND_EXTENSION, "select_max_kept": _TRAIN_SELECT_MAX_KEPT}
    if extension is not None:
        _TRAIN_EXPAND_EXTENSION = bool(extension)
    if select_max_kept is not None:
        if not 0 <= select_max_kept <= 1:
            raise ValueError(f"select_max_kept must be a fraction in [0, 1], got {select_max_kept!r}")
        _TRAIN_SELECT_MAX_KEPT = float(select_max_kept)
    return before


def _plain_autograd() -> bool:
    """Eager reverse-mode autograd only, which the extension's C++ autograd node supports: no
    ``torch.func`` transform (grad, vmap, jacrev), no forward-mode AD level, no tracing or
    compiling."""
    return not (torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0
                or torch.jit.is_tracing() or torch.compiler.is_compiling())


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


class KSEConv2d(nn.Module):
    """2D convolution with KSE-clustered kernels and skipped input channels.

    Build it with :meth:`from_conv`; :meth:`to_conv` gives back an equivalent ``nn.Conv2d``.
    Supports any stride, padding, dilation and (non-square) kernel; ``groups`` must be 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, kept: Optional[Tensor] = None, centroid_counts: Optional[Tensor] = None) -> None:
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, pair(kernel_size)
        self.stride, self.dilation = pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        kept = torch.arange(in_channels) if kept is None else torch.as_tensor(kept, dtype=torch.long)
        if centroid_counts is None:
            centroid_counts = torch.full((len(kept),), out_channels, dtype=torch.long)
        centroid_counts = torch.as_tensor(centroid_counts, dtype=torch.long)
        if len(kept) != len(centroid_counts):
            raise ValueError(f"kept ({len(kept)} channels) and centroid_counts ({len(centroid_counts)} values) "
                             "must have the same length")
        self.centroids = nn.Parameter(torch.zeros(int(centroid_counts.sum()), *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer("kept_channels", kept)
        self.register_buffer("centroid_counts", centroid_counts)
        self.register_buffer("assignment", torch.zeros(len(kept), out_channels, dtype=torch.long))
        self.form = "train"  # the inference form: "train" (not deployed) runs forms.default_form
        self._epilogue: Optional[Tuple[Tensor, Tensor, bool]] = None  # see set_epilogue
        self._inference = None  # eval mode: the callable forms.prepare made for self.form
        self._index: Optional[WeightIndex] = None  # training: see training_weight

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, counts: Tensor, generator: Optional[torch.Generator] = None,
                  iters: int = 50, n_init: int = 1) -> "KSEConv2d":
        """Cluster ``conv``'s kernels with ``counts[c]`` centroids for input channel c
        (:func:`kse.centroid_counts`: 0 drops the channel, N keeps its kernels as they are)."""
        cls.check_conv(conv)
        return cls.from_clusters(conv, counts, *cluster_kernels(conv.weight, counts, generator, iters, n_init))

    @staticmethod
    def check_conv(conv: nn.Module) -> None:
        """Raise a TypeError / ValueError if ``conv`` is not a convolution KSE can replace."""
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"KSE needs groups == 1, got a conv with groups={conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"KSE supports padding_mode='zeros' only, got {conv.padding_mode!r}")

    @classmethod
    def from_clusters(cls, conv: nn.Conv2d, counts: Tensor, kept: Tensor, centroids: Tensor,
                      assignment: Tensor) -> "KSEConv2d":
        """The layer for ``conv`` with clusters already computed (what ``cluster_kernels`` returns),
        in ``conv``'s mode (training or eval)."""
        cls.check_conv(conv)
        counts = torch.as_tensor(counts, dtype=torch.long).cpu()
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.bias is not None, kept, counts[kept])
        with torch.no_grad():
            layer.centroids.copy_(centroids)
            layer.assignment.copy_(assignment)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer.to(device=conv.weight.device, dtype=conv.weight.dtype).train(conv.training)

    def to_conv(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function (dropped channels get zero kernels)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, 1, self.bias is not None).to(self.centroids.device, self.centroids.dtype)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, self.kept_channels] = self.clustered_weight()
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    # ------------------------------------------------------------------ weights and forward
    def clustered_weight(self) -> Tensor:
        """``W' : Tensor[N, C_kept, kh, kw]`` with ``W'[n, j] = centroids[assignment[j, n]]``
        (differentiable: the gradient of a centroid is the sum of its kernels' gradients)."""
        K, N = self.assignment.shape
        kh, kw = self.kernel_size
        rows = self.centroids.reshape(-1, kh * kw).index_select(0, self.assignment.t().reshape(-1))
        return rows.view(N, K, kh, kw)

    def training_weight(self, channels_last: bool = False, full: Optional[bool] = None) -> Tensor:
        """W' as a training step builds it, on every call: over the kept input channels or, with
        ``full``, all of them (zero kernels for the dropped; default: as the forward decides), in
        ``channels_last`` or NCHW order. Recorded by autograd on the CPU: the compiled
        :func:`kse.fused.expand_weight`; otherwise (and as its reference) :func:`gather_elements`."""
        p, a, k = self._parameters["centroids"], self._buffers["assignment"], self._buffers["kept_channels"]
        full = self._convolves_all() if full is None else full
        index = self._index
        if index is None or not index.made_from(a, k, len(p)):  # a new buffer (or a refresh) rebuilds it
            index = self._index = WeightIndex(a, k, self.in_channels, len(p), self.kernel_size)
        if (_TRAIN_EXPAND_EXTENSION and p.is_cpu and p.requires_grad and torch.is_grad_enabled()
                and _plain_autograd() and fused.available()):
            return fused.expand_weight(p, index.rows(full), channels_last, index.disjoint(full))
        kh, kw = self.kernel_size
        weight = gather_elements(p.reshape(-1, kh * kw), index.elements(full, channels_last))
        return (weight.view(self.out_channels, kh, kw, -1).permute(0, 3, 1, 2) if channels_last
                else weight.view(self.out_channels, -1, kh, kw))

    def _convolves_all(self) -> bool:
        """Whether a training step convolves all input channels (zero kernels for the dropped) rather
        than gathering the kept ones: with few dropped (the gather costs more than it saves) or none kept."""
        kept = self._buffers["kept_channels"].shape[0]
        return kept == 0 or kept > _TRAIN_SELECT_MAX_KEPT * self.in_channels

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # one image [C, H, W], as nn.Conv2d accepts
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if self.training:
            return self._forward_train(x)
        if self._needs_gradients(x):
            self._inference = None  # the parameters may change after this call (an optimizer step)
            return self._forward_train(x)
        run = self._inference
        if run is None:  # after a call with gradients, or while compiling
            run = forms.prepare(self, self.form)
            if not torch.compiler.is_compiling():  # parameters are stand-ins there: keep nothing
                self._inference = run
        return run(x)

    def _needs_gradients(self, x: Tensor) -> bool:
        """Whether an eval-mode call must run the training form: autograd records it (the input or
        a parameter requires a gradient: saliency maps, fine-tuning with BatchNorm frozen), or a
        ``torch.func`` transform or forward-mode AD is active. Not while ``torch.jit.trace`` or
        ``torch.export`` record the model: the export keeps the inference form."""
        if torch.is_grad_enabled() and not (torch.jit.is_tracing() or torch.compiler.is_exporting()):
            bias = self._parameters.get("bias")
            if x.requires_grad or self._parameters["centroids"].requires_grad or (bias is not None and bias.requires_grad):
                return True
        return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0

    def _forward_train(self, x: Tensor) -> Tensor:
        full = self._convolves_all()
        weight = self.training_weight(is_channels_last(x), full)
        inputs = x if full else forms.select_channels(x, self.kept_channels)
        out = F.conv2d(inputs, weight, self._parameters.get("bias"), self.stride, self.padding, self.dilation)
        if self._epilogue is None:
            return out
        scale, shift, relu = self._epilogue
        return forms.affine_output(out, scale.to(out.dtype), shift.to(out.dtype), relu)

    # ------------------------------------------------------------------ modes and cached tensors
    def train(self, mode: bool = True) -> "KSEConv2d":
        """Training mode drops the inference tensors; eval mode (``mode=False``) rebuilds them."""
        super().train(mode)
        return self.refresh()

    def refresh(self) -> "KSEConv2d":
        """Rebuild what the layer derives from its parameters and buffers (in eval mode the
        inference tensors, and the training index). Needed after editing ``centroids``, ``bias``,
        ``assignment`` or ``kept_channels`` in place in eval mode (an optimizer step taken after
        an inference call, ``layer.centroids.mul_(2)`` under ``no_grad``); ``model.eval()`` does
        the same for every layer."""
        self._index = None
        self._inference = None if self.training else forms.prepare(self, self.form)
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    def _apply(self, fn, recurse=True):  # .to(), .half(), .cuda(): the prepared tensors follow
        super()._apply(fn, recurse)
        if self._epilogue is not None:
            scale, shift, relu = self._epilogue
            self._epilogue = (fn(scale), fn(shift), relu)
        if "fused" in self.form and not fused.supports(self):  # e.g. .half(): the kernel is float32 only
            self.form = without_fused(self.form)
            warnings.warn(f"KSEConv2d: the fused form needs float32 centroids; {self.centroids.dtype} "
                          f"layers use {self.form!r} instead", RuntimeWarning, stacklevel=2)
        return self.refresh()

    # ------------------------------------------------------------------ inference forms
    def set_form(self, form: str) -> "KSEConv2d":
        """Run ``form`` in eval mode: ``"train"`` (not deployed: :func:`kse.forms.default_form`),
        ``"dense"``, ``"full"``, ``"split"``, ``"fused"`` (the compiled CPU kernel, stride-1
        float32 layers), or a form per batch size, ``"fused@1,full@64"``: each input runs in the
        form given for the listed batch size nearest to its own (geometrically: here batches 1-8
        fused, 9 and up full). See :mod:`kse.forms`."""
        forms.resolve(self, form)  # a ValueError where the layer cannot run it
        self.form = form
        return self.refresh()

    def form_for_batch(self, batch: int) -> str:
        """The inference form an eval-mode input of ``batch`` images runs in."""
        return forms.form_at(forms.resolve(self, self.form), batch)

    def kernel_padding(self) -> Optional[Tuple[int, int]]:
        """The padding as two numbers (``"valid"``: none; ``"same"``: half the dilated kernel on
        each side), or ``None`` where ``"same"`` pads one side more than the other."""
        if not isinstance(self.padding, str):
            return tuple(self.padding)
        if self.padding == "valid":
            return 0, 0
        spans = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
        return None if any(s % 2 for s in spans) else (spans[0] // 2, spans[1] // 2)

    @property
    def epilogue(self) -> Optional[Tuple[Tensor, Tensor, bool]]:
        """``(scale, shift, relu)`` set by :meth:`set_epilogue`, or ``None``."""
        return self._epilogue

    def set_epilogue(self, scale: Optional[Tensor], shift: Optional[Tensor] = None, relu: bool = False) -> "KSEConv2d":
        """Inference: the layer outputs ``relu?(scale * conv(x) + shift)`` (per output channel),
        e.g. with a following eval-mode BatchNorm (and ReLU) folded in, as :func:`kse.fold_batchnorm`
        does; ``scale=None`` removes it. The dense and full forms fold it into their weight, the
        fused kernel applies it as it writes its outputs; a layer with an epilogue cannot be
        saved (fold a copy, after saving)."""
        if scale is None:
            self._epilogue = None
        else:
            n, p = self.out_channels, self.centroids
            scale = torch.as_tensor(scale).detach().reshape(-1)
            shift = torch.zeros(n) if shift is None else torch.as_tensor(shift).detach().reshape(-1)
            if len(scale) != n or len(shift) != n:
                raise ValueError(f"scale and shift need {n} values (one per output channel), "
                                 f"got {len(scale)} and {len(shift)}")
            self._epilogue = (scale.to(p.device, p.dtype), shift.to(p.device, p.dtype), bool(relu))
        return self.refresh()

    def affine(self) -> Tuple[Tensor, Tensor]:
        """``(s, b)`` with the layer's output ``= s * (conv without bias) + b`` (epilogue included)."""
        n, p = self.out_channels, self.centroids
        bias = self.bias.detach() if self.bias is not None else p.new_zeros(n)
        if self._epilogue is None:
            return p.new_ones(n), bias
        scale, shift, _ = self._epilogue
        return scale, scale * bias + shift

    # ------------------------------------------------------------------ channel removal
    def remove_out_channels(self, remove: Sequence[int]) -> "KSEConv2d":
        """A copy without output channels ``remove`` (:func:`remove_out_channels`)."""
        return remove_out_channels(self, remove)

    def remove_in_channels(self, remove: Sequence[int]) -> "KSEConv2d":
        """A copy without input channels ``remove``, all skipped ones (:func:`remove_in_channels`)."""
        return remove_in_channels(self, remove)

    # ------------------------------------------------------------------ storage and reporting
    def local_assignment(self) -> Tensor:
        """``LongTensor[C_kept, N]``: each kernel's centroid index within its own channel."""
        return self.assignment - centroid_offsets(self.centroid_counts).unsqueeze(1)

    def index_bit_widths(self) -> list:
        """Bits per stored index, per kept channel: 0 when q = 1, or when a channel kept whole
        maps kernel n to centroid n; else ceil(log2 q)."""
        local = self.local_assignment()
        identity = torch.arange(self.out_channels, device=local.device)
        return [0 if q == 1 or (q == self.out_channels and torch.equal(local[j], identity)) else math.ceil(math.log2(q))
                for j, q in enumerate(self.centroid_counts.tolist())]

    def dense_params(self) -> int:
        return self.out_channels * self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def compression_ratio(self) -> float:
        """Dense kernel parameters / centroid parameters (bias excluded)."""
        return self.dense_params() / max(self.centroids.numel(), 1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}" + (f", dilation={self.dilation}" if self.dilation != (1, 1) else "")
                + (", bias=False" if self.bias is None else "") + f", kept={len(self.kept_channels)}/{self.in_channels}, "
                f"centroids={len(self.centroids)}, ratio={self.compression_ratio():.2f}x, form={self.form}")


# ----------------------------------------------------------------------------- channel removal
def remove_out_channels(layer: KSEConv2d, remove: Sequence[int]) -> KSEConv2d:
    """A copy of ``layer`` without output channels ``remove``; unused centroids are dropped."""
    keep_out = [n for n in range(layer.out_channels) if n not in set(remove)]
    assignment = layer.assignment[:, keep_out]
    used = torch.zeros(len(layer.centroids), dtype=torch.bool, device=assignment.device)
    used[assignment.flatten()] = True  # centroid rows still referenced, in order
    owner = torch.repeat_interleave(torch.arange(len(layer.kept_channels), device=assignment.device),
                                    layer.centroid_counts)
    counts = torch.bincount(owner[used], minlength=len(layer.kept_channels))
    copy = KSEConv2d(layer.in_channels, len(keep_out), layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, layer.bias is not None, layer.kept_channels.clone(), counts.cpu())
    copy = copy.to(layer.centroids.device, layer.centroids.dtype)
    with torch.no_grad():
        copy.centroids.copy_(layer.centroids[used])
        copy.assignment.copy_((torch.cumsum(used.long(), 0) - 1)[assignment])
        if layer.bias is not None:
            copy.bias.copy_(layer.bias[keep_out])
    return copy.set_form(layer.form).train(layer.training)


def remove_in_channels(layer: KSEConv2d, remove: Sequence[int]) -> KSEConv2d:
    """A copy of ``layer`` reading ``in_channels - len(remove)`` maps; every removed channel must
    be one the layer already skips (``q_c = 0``), so the function is unchanged."""
    remove_set = set(int(r) for r in remove)
    kept = layer.kept_channels.tolist()
    clash = remove_set.intersection(kept)
    if clash:
        raise ValueError(f"cannot remove input channels {sorted(clash)}: the layer still reads them")
    position = {c: i for i, c in enumerate(c for c in range(layer.in_channels) if c not in remove_set)}
    copy = KSEConv2d(len(position), layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, layer.bias is not None, torch.tensor([position[c] for c in kept], dtype=torch.long),
                     layer.centroid_counts.cpu().clone())
    copy = copy.to(layer.centroids.device, layer.centroids.dtype)
    copy.load_state_dict({**layer.state_dict(), "kept_channels": copy.kept_channels})
    return copy.set_form(layer.form).train(layer.training)
