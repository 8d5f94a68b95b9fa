"""``KSEConv2d``: a convolution whose kernels are shared centroids (KSE Sec. 3.4-3.5).

For each kept input channel c (``q_c > 0``) the N kernels ``W[:, c]`` are replaced by q_c
centroids ``B_c``; kernel n uses centroid ``idx_c[n]``:

    W'[n, c] = B_c[idx_c[n]]          (Tensor[N, C_kept, kh, kw])

Input channels with ``q_c = 0`` are skipped. All centroids of a layer live in one parameter
``centroids: Tensor[M, kh, kw]`` (M = sum_c q_c); ``assignment: LongTensor[C_kept, N]`` holds,
for each kept channel and output, the row of its centroid (frozen; the centroids train).

In training mode, and in eval mode where autograd records the call, the layer rebuilds W' on
every call (the training form, :mod:`kse.training_weight`). In eval mode without gradients it
runs an inference form (:mod:`kse.forms`) from tensors prepared once, the dense weight unless
:meth:`KSEConv2d.set_form` / :func:`kse.deploy_` chose another; :meth:`KSEConv2d.refresh` says
when they are rebuilt. Channel removal: :mod:`kse.channel_surgery`.

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

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import channel_surgery, forms
from .forms import is_channels_last
from .kmeans import cluster_kernels
from .training_weight import WeightIndex, convolves_all, expand_centroids, records_gradients


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
        ``channels_last`` or NCHW order (:func:`kse.training_weight.expand_centroids`)."""
        p, a, k = self._parameters["centroids"], self._buffers["assignment"], self._buffers["kept_channels"]
        full = convolves_all(len(k), self.in_channels) if full is None else full
        index = self._index
        if index is None or not index.made_from(a, k, len(p)):  # a new buffer (or a refresh) rebuilds it
            index = self._index = WeightIndex(a, k, self.in_channels, len(p), self.kernel_size)
        return expand_centroids(p, index, full, channels_last)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # one image [C, H, W], as nn.Conv2d accepts
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if self.training:
            return self._forward_train(x)
        if records_gradients(x, self._parameters["centroids"], self._parameters.get("bias")):
            self._inference = None  # the parameters may change after this call (an optimizer step)
            return self._forward_train(x)
        run = self._inference
        if run is None:  # after a call with gradients, or while compiling
            run = forms.prepare(self, self.form)
            if not torch.compiler.is_compiling():  # parameters are stand-ins there: keep nothing
                self._inference = run
        return run(x)

    def _forward_train(self, x: Tensor) -> Tensor:
        full = convolves_all(len(self.kept_channels), self.in_channels)
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
        inference tensors, and the training index). ``train()``/``eval()``, :meth:`set_form`,
        ``load_state_dict``, ``.to()`` and a call that records gradients do; after editing
        ``centroids``, ``bias``, ``assignment`` or ``kept_channels`` in place in eval mode
        otherwise (an optimizer step taken after an inference call, ``layer.centroids.mul_(2)``
        under ``no_grad``) call it, or ``model.eval()`` for every layer."""
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
        self.form = forms.supported_form(self)  # e.g. .half(): the fused kernel is float32 only
        return self.refresh()

    # ------------------------------------------------------------------ inference forms
    def set_form(self, form: str) -> "KSEConv2d":
        """Run ``form`` in eval mode: ``"train"`` (not deployed: :func:`kse.forms.default_form`),
        ``"dense"``, ``"full"``, ``"split"``, ``"fused"`` (the compiled CPU kernel), or one per batch
        size, ``"fused@1,full@64"`` (here batches 1-8 fused, 9 and up full). See :mod:`kse.forms`."""
        forms.resolve(self, form)  # a ValueError where the layer cannot run it
        self.form = form
        return self.refresh()

    def form_for_batch(self, batch: int) -> str:
        """The inference form an eval-mode input of ``batch`` images runs in."""
        return forms.form_at(forms.resolve(self, self.form), batch)

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
        self._epilogue = (None if scale is None
                          else forms.epilogue(scale, shift, relu, self.out_channels, self.centroids))
        return self.refresh()

    def affine(self) -> Tuple[Tensor, Tensor]:
        """``(s, b)`` with the layer's output ``= s * (conv without bias) + b`` (epilogue included)."""
        n, p = self.out_channels, self.centroids
        bias = self.bias.detach() if self.bias is not None else p.new_zeros(n)
        if self._epilogue is None:
            return p.new_ones(n), bias
        scale, shift, _ = self._epilogue
        return scale, scale * bias + shift

    # ------------------------------------------------------------------ channel removal and reporting
    def remove_out_channels(self, remove: Sequence[int]) -> "KSEConv2d":
        """A copy without output channels ``remove`` (:func:`kse.channel_surgery.remove_out_channels`)."""
        return channel_surgery.remove_out_channels(self, remove)

    def remove_in_channels(self, remove: Sequence[int]) -> "KSEConv2d":
        """A copy without (skipped) input channels ``remove`` (:func:`kse.channel_surgery.remove_in_channels`)."""
        return channel_surgery.remove_in_channels(self, remove)

    def compression_ratio(self) -> float:
        """Dense kernel parameters ``N * C * kh * kw`` / centroid parameters (bias excluded)."""
        dense = self.out_channels * self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        return dense / max(self.centroids.numel(), 1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}" + (f", dilation={self.dilation}" if self.dilation != (1, 1) else "")
                + (", bias=False" if self.bias is None else "") + f", kept={len(self.kept_channels)}/{self.in_channels}, "
                f"centroids={len(self.centroids)}, ratio={self.compression_ratio():.2f}x, form={self.form}")
