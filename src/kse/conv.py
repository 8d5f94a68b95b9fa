"""``KSEConv2d``: a convolution whose kernels are shared centroids (KSE Sec. 3.4-3.5).

For each kept input channel c (``q_c > 0``) the N kernels ``W[:, c]`` are replaced by q_c
centroids ``B_c``; kernel n uses centroid ``idx_c[n]``:

    W'[n, c] = B_c[idx_c[n]]          (Tensor[N, C_kept, kh, kw])

Input channels with ``q_c = 0`` are skipped (``index_select`` on the input). Centroids are
trainable and assignments frozen, so the gradient of a centroid is the sum of the gradients
of the kernels assigned to it (KSE.md §6). All centroids of a layer live in one parameter
``centroids: Tensor[M, kh, kw]`` (M = sum_c q_c); ``assignment: LongTensor[C_kept, N]``
holds, for each kept channel and output, the row of its centroid.

Forms (``layer.form``): ``"train"`` rebuilds W' every call (gradients reach the centroids; on
the CPU in one call of the compiled :func:`kse.fused.expand_weight`, else with stock
operations); ``"dense"`` caches W' once (inference: a dense conv over the kept channels);
``"full"`` caches it zero-filled over all input channels (no gather of the input: never slower
than the original conv); ``"split"`` is the paper's deployment (Fig. 2): convolve every kept
map with its q_c centroids, then sum the maps of the assigned centroids ("channel fusion");
``"fused"`` does both in one pass of the compiled kernel (:mod:`kse.fused`). See
:func:`kse.deploy_`.

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
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import fused
from .kmeans import batched_kmeans, draw_seeds

FORMS = ("train", "dense", "full", "split", "fused")
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
        if name not in FORMS or name == "train" or not size.isdigit() or int(size) < 1:
            raise ValueError(f"form {form!r}: each part must be an inference form {FORMS[1:]} and a batch size, "
                             f"like 'fused@1,full@64'; got {part!r}")
        entries.append((int(size), name))
    if any(b1 <= b0 for (b0, _), (b1, _) in zip(entries, entries[1:])):
        raise ValueError(f"form {form!r}: batch sizes must increase")
    return entries


def without_fused(form: str, replacement: str = "dense") -> str:
    """``form`` with the compiled kernel replaced by ``replacement`` (``replacement`` alone if
    ``form`` is unreadable)."""
    try:
        return batch_form([(b, replacement if f == "fused" else f) for b, f in parse_form(form)])
    except ValueError:
        return replacement


def batch_form(choices: Sequence[Tuple[int, str]]) -> str:
    """The form string for ``[(batch, form), ...]``: one form if all agree, else a form per size."""
    choices = sorted(choices)
    if len({f for _, f in choices}) == 1:
        return choices[0][1]
    return ",".join(f"{f}@{b}" for b, f in choices)


def centroid_offsets(counts: Tensor) -> Tensor:
    """First centroid row of each kept channel: the exclusive prefix sum of ``counts``."""
    offsets = torch.zeros_like(counts)
    if len(counts) > 1:
        offsets[1:] = counts.cumsum(0)[:-1]
    return offsets


def cluster_kernels(weight: Tensor, counts: Tensor, generator: Optional[torch.Generator] = None,
                    iters: int = 50, n_init: int = 1):
    """k-means the N kernels of every input channel into ``counts[c]`` centroids.

    Channels are processed in batches of equal count (one batched k-means per distinct q).

    Args:
        weight: ``Tensor[N, C, kh, kw]``.
        counts: ``LongTensor[C]``, each in ``[0, N]`` (0: channel dropped).
    Returns:
        ``(kept: LongTensor[K], centroids: Tensor[M, kh, kw], assignment: LongTensor[K, N])``
        with K the channels whose count is > 0, in increasing order, and
        ``assignment[j, n]`` the centroid row of kernel n of kept channel ``kept[j]``.
    """
    return cluster_many([(weight, counts, generator)], iters, n_init)[0]


def cluster_many(jobs: Sequence[Tuple[Tensor, Tensor, Optional[torch.Generator]]], iters: int = 50, n_init: int = 1,
                 map_fn: Callable = map) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """``cluster_kernels`` for several layers at once: ``jobs`` holds ``(weight, counts, generator)``.

    Channel sets of equal shape and centroid count are clustered in one batched k-means across
    layers (the per-call overhead dominates for small buckets), while each layer draws its
    k-means++ numbers from its own generator: a layer's result is the same as alone.
    ``map_fn`` runs the batched calls (e.g. a thread pool's ``map``).
    """
    layers, groups = [], {}
    for j, (weight, counts, generator) in enumerate(jobs):
        N, C, kh, kw = weight.shape
        counts = torch.as_tensor(counts).to(torch.long).cpu()
        if counts.shape != (C,) or (counts < 0).any() or (counts > N).any():
            lo, hi = (int(counts.min()), int(counts.max())) if counts.numel() else (0, 0)
            raise ValueError(f"centroid counts must be LongTensor[{C}] with values in [0, {N}], got shape "
                             f"{tuple(counts.shape)} with values in [{lo}, {hi}]")
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        kept = torch.nonzero(counts > 0).flatten()
        kernels = weight.detach().reshape(N, C, kh * kw).transpose(0, 1)  # [C, N, D]
        kept_counts = counts[kept]
        work_dtype = torch.promote_types(weight.dtype, torch.float32)
        layers.append((weight, kept, kept_counts))
        for q in torch.unique(kept_counts).tolist():
            pos = torch.nonzero(kept_counts == q).flatten()  # positions in `kept`
            points = kernels[kept[pos].to(weight.device)].to(work_dtype)
            seeds = draw_seeds(len(pos), N, q, n_init, generator) if 1 < q < N else None
            key = (N, kh * kw, q, work_dtype, str(weight.device))
            groups.setdefault(key, []).append((j, pos, points, seeds))

    def run(key):
        members = groups[key]
        q = key[2]
        points = torch.cat([m[2] for m in members])
        seeds = None
        if members[0][3] is not None:
            seeds = (torch.cat([m[3][0] for m in members], 1), torch.cat([m[3][1] for m in members], 1))
        return batched_kmeans(points, q, iters=iters, n_init=n_init, seeds=seeds)

    # largest first, so that parallel workers finish together
    keys = sorted(groups, key=lambda k: -k[0] * k[1] * k[2] * sum(len(m[1]) for m in groups[k]))
    results = [(weight.new_empty(int(kc.sum()), weight.shape[2] * weight.shape[3]),
                torch.empty(len(kept), weight.shape[0], dtype=torch.long)) for weight, kept, kc in layers]
    offsets = [centroid_offsets(kc) for _, _, kc in layers]  # centroid rows: channel after channel, in kept order
    for key, (cents, assign) in zip(keys, map_fn(run, keys)):
        q, start = key[2], 0
        for j, pos, _, _ in groups[key]:
            part = slice(start, start + len(pos))
            start += len(pos)
            centroids, assignment = results[j]
            rows = offsets[j][pos].unsqueeze(1) + torch.arange(q)  # [P, q]
            centroids[rows.flatten().to(centroids.device)] = cents[part].reshape(-1, key[1]).to(centroids.dtype)
            assignment[pos] = assign[part].cpu() + offsets[j][pos].unsqueeze(1)
    return [(kept, centroids.reshape(len(centroids), *weight.shape[2:]), assignment)
            for (weight, kept, _), (centroids, assignment) in zip(layers, results)]


# Above this fraction of kept input channels, a training step convolves all input channels (zero
# kernels for the dropped ones) instead of gathering the kept ones: on this project's CPU, a
# 64->64 3x3 layer at 7x7, batch 128, channels_last, trained 23% slower than the dense conv
# with 55/64 channels gathered, and 33% faster with 29/64 (benchmarks/train_step.py: whole model)
_TRAIN_SELECT_MAX_KEPT = 2 / 3

# Build W' in training with the compiled extension where it applies (CPU); False: always with
# stock operations (benchmarks/train_step.py --stock-weight compares the two)
_TRAIN_EXPAND_EXTENSION = True


def _plain_autograd() -> bool:
    """Eager reverse-mode autograd only, which the extension's C++ autograd node supports: no
    ``torch.func`` transform (grad, vmap, jacrev), no forward-mode AD level, no tracing or
    compiling."""
    return not (torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0
                or torch.jit.is_tracing() or torch.compiler.is_compiling())


def _is_channels_last(x: Tensor) -> bool:
    """A 4-D tensor laid out channels_last (and not also plain contiguous, as 1x1 maps are)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def gather_elements(rows: Tensor, index: Tensor) -> Tensor:
    """``out = cat([rows, 0]).flatten()[index]``: the elements of W' from the centroids (the
    appended row of zeros serves the kernels of dropped channels).

    ``index`` addresses single elements, so W' comes out in the memory order the convolution
    wants (channels_last for channels_last inputs: a weight in the other layout costs a
    conversion each way). Backward (autograd of ``index_select``): ``index_add`` into zeros,
    so the gradient of a centroid is the sum of the gradients of its kernels (KSE.md §6).
    Stock operations, whose backward runs in C++ (a Python ``autograd.Function`` doing the same
    took 8.4 ms per ResNet-56 step on this project's CPU for its 54 layers, these 5.4 ms): the
    form used off the CPU or without the compiled extension, and the reference for
    :func:`kse.fused.expand_weight`."""
    return F.pad(rows, (0, 0, 0, 1)).reshape(-1).index_select(0, index)


# optimizer steps taken in this process (a post hook on every torch.optim optimizer): any step may
# have changed the parameters behind a layer's cached inference tensors
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class _DeployedWithGradients(torch.autograd.Function):
    """An eval-mode call that needs gradients: forward, the deployed form (the compiled kernel
    included); backward, the gradients of the training form, which computes the same function,
    recomputed from the saved input as activation checkpointing does. Not differentiable twice."""

    @staticmethod
    def forward(ctx, layer: "KSEConv2d", x: Tensor, centroids: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x, centroids)  # an in-place change before backward raises, as usual
        return layer._forward_deployed(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        layer = ctx.layer
        x, centroids = ctx.saved_tensors
        wanted = ctx.needs_input_grad[1:]  # x, centroids, bias
        with torch.enable_grad():
            xi = x.detach().requires_grad_(wanted[0])
            out = layer._forward_train(xi)
            inputs = [t for t, w in zip((xi, centroids, layer.bias), wanted) if w]
            grads = iter(torch.autograd.grad(out, inputs, grad, allow_unused=True))
        return (None, *(next(grads) if w else None for w in wanted))


def _refresh_after_load(module: "KSEConv2d", incompatible_keys) -> None:
    """load_state_dict post hook (a module-level function, so that the layer can be pickled)."""
    module._refresh()


class KSEConv2d(nn.Module):
    """2D convolution with KSE-clustered kernels and skipped input channels.

    Build it with :meth:`from_conv`; :meth:`to_conv` gives back an equivalent ``nn.Conv2d``.
    Supports any stride, padding, dilation and (non-square) kernel; ``groups`` must be 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, kept: Optional[Tensor] = None, centroid_counts: Optional[Tensor] = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = nn.modules.utils._pair(kernel_size)
        self.stride = nn.modules.utils._pair(stride)
        self.padding = padding if isinstance(padding, str) else nn.modules.utils._pair(padding)
        self.dilation = nn.modules.utils._pair(dilation)
        if kept is None:
            kept = torch.arange(in_channels)
        if centroid_counts is None:
            centroid_counts = torch.full((len(kept),), out_channels, dtype=torch.long)
        kept = torch.as_tensor(kept, dtype=torch.long)
        centroid_counts = torch.as_tensor(centroid_counts, dtype=torch.long)
        if len(kept) != len(centroid_counts):
            raise ValueError(f"kept ({len(kept)} channels) and centroid_counts ({len(centroid_counts)} values) "
                             "must have the same length")
        kh, kw = self.kernel_size
        total = int(centroid_counts.sum())
        self.centroids = nn.Parameter(torch.zeros(total, kh, kw))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer("kept_channels", kept)
        self.register_buffer("centroid_counts", centroid_counts)
        self.register_buffer("assignment", torch.zeros(len(kept), out_channels, dtype=torch.long))
        self.form = "train"
        self._batch_forms: List[Tuple[int, str]] = [(1, "train")]
        self._deploy: dict = {}
        self._epilogue: Optional[Tuple[Tensor, Tensor, bool]] = None  # inference only: see set_epilogue
        self.register_load_state_dict_post_hook(_refresh_after_load)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, counts: Tensor, generator: Optional[torch.Generator] = None,
                  iters: int = 50, n_init: int = 1) -> "KSEConv2d":
        """Cluster ``conv``'s kernels with ``counts[c]`` centroids for input channel c.

        ``counts`` is what :func:`kse.centroid_counts` returns (0: drop the channel,
        N: keep its kernels as they are).
        """
        cls._check_conv(conv)
        return cls.from_clusters(conv, counts, *cluster_kernels(conv.weight, counts, generator, iters, n_init))

    @staticmethod
    def _check_conv(conv: nn.Module) -> None:
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"KSE needs groups == 1, got a conv with groups={conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"KSE supports padding_mode='zeros' only, got {conv.padding_mode!r}")

    @classmethod
    def from_clusters(cls, conv: nn.Conv2d, counts: Tensor, kept: Tensor, centroids: Tensor,
                      assignment: Tensor) -> "KSEConv2d":
        """The layer for ``conv`` with clusters already computed (what ``cluster_kernels`` returns)."""
        cls._check_conv(conv)
        counts = torch.as_tensor(counts, dtype=torch.long).cpu()
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.bias is not None, kept, counts[kept])
        with torch.no_grad():
            layer.centroids.copy_(centroids)
            layer.assignment.copy_(assignment)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def to_conv(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function (dropped channels get zero kernels)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, 1, self.bias is not None)
        conv = conv.to(device=self.centroids.device, dtype=self.centroids.dtype)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, self.kept_channels] = self.clustered_weight()
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    # ------------------------------------------------------------------ math
    def clustered_weight(self) -> Tensor:
        """``W' : Tensor[N, C_kept, kh, kw]`` with ``W'[n, j] = centroids[assignment[j, n]]``.

        Built contiguous with ``index_select`` (its backward is an ``index_add``: the gradient of
        a centroid is the sum of its kernels' gradients, KSE.md §6)."""
        K, N = self.assignment.shape
        kh, kw = self.kernel_size
        rows = self.centroids.reshape(-1, kh * kw).index_select(0, self.assignment.t().reshape(-1))
        return rows.view(N, K, kh, kw)

    def _train_cached(self, what: str, full: bool, channels_last: bool = False, centroids: Optional[Tensor] = None):
        """Index tensors for building W' in training, cached until the assignment changes:
        ``"rows"``, the centroid row of each kernel (``int32 [N, C_kept]``, or with ``full``
        ``[N, C]`` with -1 for the dropped channels) with whether no row serves two channels;
        ``"index"``, for every element of W' its position in the flattened ``[M + 1, kh * kw]``
        table of centroids plus a zero row (row M, for dropped channels), in NCHW or
        ``channels_last`` memory order. ``centroids``: ``self.centroids``, if the caller has it."""
        # keyed on the tensors themselves (held, so that no new tensor can take a freed one's
        # address) and their versions: a new buffer, a device move or an in-place edit rebuilds.
        # Read from the module's dicts (nn.Module.__getattr__ costs microseconds a call, and this
        # runs for every layer on every training step)
        a, k = self._buffers["assignment"], self._buffers["kept_channels"]
        m = (self.centroids if centroids is None else centroids).shape[0]
        cache = self.__dict__.get("_index_cache")
        if cache is None or not (cache[0][0] is a and cache[0][1] == a._version and cache[0][2] is k
                                 and cache[0][3] == k._version and cache[0][4] == m):
            cache = ((a, a._version, k, k._version, m), {})
            self.__dict__["_index_cache"] = cache
        found = cache[1].get((what, full, channels_last))
        if found is not None:
            return found
        rows = self.assignment.t()  # [N, C_kept]: centroid row of each kernel
        if full:
            rows = torch.full((self.out_channels, self.in_channels), -1, dtype=torch.long,
                              device=rows.device).index_copy_(1, self.kept_channels, rows)
        if what == "rows":  # and whether no centroid row serves two input channels (true for KSE layers):
            used = rows >= 0  # give every row the column of one of its users; all agree iff none is shared
            cols = torch.arange(rows.shape[1], device=rows.device).expand_as(rows)[used]
            owner = torch.full((m,), -1, dtype=torch.long, device=rows.device).index_put_((rows[used],), cols)
            found = (rows.to(torch.int32).contiguous(), bool((owner[rows[used]] == cols).all()))
        else:
            rows = torch.where(rows < 0, m, rows)
            d = self.kernel_size[0] * self.kernel_size[1]
            taps = torch.arange(d, device=rows.device)
            if channels_last:  # [N, kh * kw, C]
                index = rows.unsqueeze(1) * d + taps.view(1, d, 1)
            else:  # [N, C, kh * kw]
                index = rows.unsqueeze(2) * d + taps
            found = index.reshape(-1).contiguous()
        cache[1][(what, full, channels_last)] = found
        return found

    def _train_full(self) -> bool:
        """Whether a training step convolves all input channels (zero kernels for the dropped
        ones) rather than gathering the kept ones: with few channels dropped the gather (and the
        scatter of its gradient) costs more than it saves; and with no channel kept, as F.conv2d
        over zero input channels answers zero outputs."""
        kept = self._buffers["kept_channels"].shape[0]
        return kept == 0 or kept > _TRAIN_SELECT_MAX_KEPT * self.in_channels

    def _train_weight(self, full: bool, channels_last: bool) -> Tensor:
        """W' for a training step, rebuilt from the centroids on every call (so that their
        gradient is the sum of their kernels' gradients, KSE.md §6): over the kept input channels,
        or with ``full`` over all of them (zero kernels for the dropped ones), laid out
        ``channels_last`` or NCHW.

        When autograd records it, on the CPU, with the compiled extension: in one call of
        :func:`kse.fused.expand_weight` (one autograd node). Otherwise, and as its reference, with
        stock operations (:func:`gather_elements`): so evaluating in the training form under
        ``no_grad`` neither needs nor builds the extension, and ``torch.func`` transforms,
        forward-mode AD, tracing and compiling get operations they know."""
        p = self.centroids
        if (_TRAIN_EXPAND_EXTENSION and p.is_cpu and p.requires_grad and torch.is_grad_enabled()
                and _plain_autograd() and fused.available()):
            rows, disjoint = self._train_cached("rows", full, centroids=p)
            return fused.expand_weight(p, rows, channels_last, disjoint)
        kh, kw = self.kernel_size
        weight = gather_elements(p.reshape(-1, kh * kw), self._train_cached("index", full, channels_last, p))
        return (weight.view(self.out_channels, kh, kw, -1).permute(0, 3, 1, 2) if channels_last
                else weight.view(self.out_channels, -1, kh, kw))

    @property
    def all_kept(self) -> bool:
        return len(self.kept_channels) == self.in_channels

    def _select(self, x: Tensor) -> Tensor:
        if self.all_kept:
            return x
        if _is_channels_last(x):
            # gather along the innermost (channel) axis, so the result stays channels_last: an
            # NCHW result would switch every following layer to the slower layout
            return x.permute(0, 2, 3, 1).index_select(3, self.kept_channels).permute(0, 3, 1, 2)
        return x.index_select(1, self.kept_channels)

    def _versions(self) -> Tuple[int, Optional[int], int]:
        """What the cached inference tensors depend on: the version counters of the centroids
        and the bias (bumped by in-place updates), and the number of optimizer steps taken in
        this process (fused optimizers such as ``SGD(fused=True)`` update parameters without
        bumping their version counters)."""
        bias = self._parameters.get("bias")
        return (self._parameters["centroids"]._version, None if bias is None else bias._version,
                _OPTIMIZER_STEPS[0])

    def _refresh(self) -> None:
        """Rebuild the cached inference tensors if the parameters may have changed since they were
        made: an in-place update, or any optimizer step. Updates through ``.data`` outside an
        optimizer are invisible: call :meth:`set_form` after them."""
        # compiling or exporting, parameters are stand-ins: the cached tensors are what gets recorded
        # (asked first: torch.compile cannot compare version counters without a graph break)
        if self.form == "train" or torch.compiler.is_compiling():
            return
        if self._deploy.get("version") != self._versions() and not torch.compiler.is_exporting():
            self.set_form(self.form)

    def _needs_grad(self, x: Tensor) -> bool:
        """Whether an eval-mode call must be differentiable: grad mode is on and the input or a
        parameter requires a gradient (saliency maps, adversarial inputs, fine-tuning with
        BatchNorm frozen). Not while ``torch.jit.trace`` or ``torch.export`` (and the ONNX
        exporters built on them) record the model: the export keeps the deployed form."""
        if not torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_exporting():
            return False
        params = self._parameters
        bias = params.get("bias")
        return x.requires_grad or params["centroids"].requires_grad or (bias is not None and bias.requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # unbatched [C, H, W], as nn.Conv2d takes it: the same in every form
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if self.form == "train" or (self.training and torch.is_grad_enabled()):
            return self._forward_train(x)  # training always rebuilds W' from the centroids
        if self._needs_grad(x):
            # the deployed form's output; the training form's gradients, recomputed in backward
            # (the compiled kernel has no backward, and the other forms' cached weights are
            # constants). torch.func transforms, forward-mode AD and torch.compile get the
            # training form itself
            if _plain_autograd():
                return _DeployedWithGradients.apply(self, x, self.centroids, self.bias)
            return self._forward_train(x)
        return self._forward_deployed(x)

    def _forward_train(self, x: Tensor) -> Tensor:
        full = self._train_full()
        weight = self._train_weight(full, _is_channels_last(x))
        out = F.conv2d(x if full else self._select(x), weight, self.bias, self.stride, self.padding, self.dilation)
        return out if self._epilogue is None else self._finish(out)

    def _forward_deployed(self, x: Tensor) -> Tensor:
        self._refresh()
        form = self._form_for_batch(x.shape[0])
        d = self._deploy[form]
        if form == "split":
            return self._forward_split(x, d)
        if form == "fused":
            if x.device.type == "cpu" and x.dtype == torch.float32:
                return fused.fused_conv(x, d, self.kernel_size, self.kernel_padding())
            inputs, weight = self._select(x), self.clustered_weight().to(x.dtype)  # another device / dtype
            return self._finish(F.conv2d(inputs, weight, self.bias, self.stride, self.padding, self.dilation))
        inputs = x if form == "full" else self._select(x)
        out = F.conv2d(inputs, d["weight"], d["bias"], self.stride, self.padding, self.dilation)
        return F.relu(out) if self._epilogue is not None and self._epilogue[2] else out

    def kernel_padding(self) -> Optional[Tuple[int, int]]:
        """The padding as two numbers (``"valid"``: none; ``"same"``: half the dilated kernel on
        each side), or ``None`` where ``"same"`` pads one side more than the other."""
        if not isinstance(self.padding, str):
            return tuple(self.padding)
        if self.padding == "valid":
            return 0, 0
        spans = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
        return None if any(s % 2 for s in spans) else (spans[0] // 2, spans[1] // 2)

    def _form_for_batch(self, batch: int) -> str:
        """The form measured at the batch size nearest to ``batch`` (geometrically)."""
        sizes = self._batch_forms
        for (b0, f0), (b1, _) in zip(sizes, sizes[1:]):
            if batch * batch <= b0 * b1:
                return f0
        return sizes[-1][1]

    def set_epilogue(self, scale: Optional[Tensor], shift: Optional[Tensor] = None, relu: bool = False) -> "KSEConv2d":
        """Inference: the layer outputs ``relu?(scale * conv(x) + shift)`` (per output channel),
        e.g. with a following eval-mode BatchNorm (and ReLU) folded in, as :func:`kse.fold_batchnorm`
        does; ``scale=None`` removes it. The dense and full forms fold it into their weight, the
        fused kernel applies it as it writes its outputs; a layer with an epilogue cannot be
        saved (fold a copy, after saving)."""
        if scale is None:
            self._epilogue = None
        else:
            n = self.out_channels
            scale = torch.as_tensor(scale).detach().reshape(-1)
            shift = torch.zeros(n) if shift is None else torch.as_tensor(shift).detach().reshape(-1)
            if len(scale) != n or len(shift) != n:
                raise ValueError(f"scale and shift need {n} values (one per output channel), "
                                 f"got {len(scale)} and {len(shift)}")
            p = self.centroids
            self._epilogue = (scale.to(p.device, p.dtype), shift.to(p.device, p.dtype), bool(relu))
        return self.set_form(self.form)

    def _affine(self) -> Tuple[Tensor, Tensor]:
        """``(s, b)`` with the layer's output ``= s * (conv without bias) + b`` (epilogue included)."""
        n, p = self.out_channels, self.centroids
        bias = self.bias.detach() if self.bias is not None else p.new_zeros(n)
        if self._epilogue is None:
            return p.new_ones(n), bias
        scale, shift, _ = self._epilogue
        return scale, scale * bias + shift

    def _finish(self, out: Tensor) -> Tensor:
        """The epilogue, applied to the output of a form that did not fold it in."""
        if self._epilogue is None:
            return out
        scale, shift, relu = self._epilogue
        out = out * scale.view(1, -1, 1, 1).to(out.dtype) + shift.view(1, -1, 1, 1).to(out.dtype)
        return F.relu(out) if relu else out

    def _forward_split(self, x: Tensor, d: dict) -> Tensor:
        """Paper Fig. 2: per-channel centroid convolution, then channel fusion by index."""
        xs = self._select(x)
        maps = []
        for chans, weight in zip(d["bucket_channels"], d["bucket_weights"]):
            xb = xs.index_select(1, chans) if chans is not None else xs
            maps.append(F.conv2d(xb, weight, None, self.stride, self.padding, self.dilation, groups=xb.shape[1]))
        maps = torch.cat(maps, 1) if len(maps) > 1 else maps[0]  # [B, M, H', W'], bucket order
        out = F.conv2d(maps, d["fusion"])  # 0/1 fusion matrix as a 1x1 conv
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return self._finish(out)

    # ------------------------------------------------------------------ deployment
    def set_form(self, form: str) -> "KSEConv2d":
        """Switch to ``"train"`` or an inference form (``"dense"``, ``"full"``, ``"split"``,
        ``"fused"``: the compiled CPU kernel of :mod:`kse.fused`, stride-1 float32 layers), or
        to a form per batch size, ``"fused@1,full@64"``: each input runs in the form given for
        the listed batch size nearest to its own (geometrically: here batches 1-8 fused, 9 and
        up full)."""
        entries = parse_form(form)
        if len(self.kept_channels) == 0:  # F.conv2d over zero input channels answers zero outputs
            entries = [(b, "full" if f in ("dense", "split") else f) for b, f in entries]
        if any(f == "fused" for _, f in entries):
            if not fused.supports(self):
                raise ValueError("the fused form needs stride 1, dilation 1, float32 centroids, a kept channel and "
                                 "equal padding on both sides; this layer has stride "
                                 f"{tuple(self.stride)}, dilation {tuple(self.dilation)}, padding {self.padding!r}, "
                                 f"{self.centroids.dtype}, {len(self.kept_channels)} kept channels")
            if not fused.available():
                raise ValueError(f"the fused KSE kernel could not be built ({fused.build_error()})")
        self._deploy = {}
        self.form, self._batch_forms = form, entries
        if form == "train":
            return self
        self._deploy["version"] = self._versions()
        with torch.no_grad():
            for f in dict.fromkeys(f for _, f in entries):
                if f in ("dense", "full"):
                    weight = self.clustered_weight().contiguous() if f == "dense" else self.to_conv().weight.detach()
                    bias = self.bias
                    if self._epilogue is not None:  # y = s * conv(x) + t, folded into the weight
                        scale, shift = self._affine()
                        weight, bias = weight * scale.view(-1, 1, 1, 1), shift
                    self._deploy[f] = {"weight": weight, "bias": bias}
                elif f == "fused":
                    self._deploy[f] = fused.prepare(self)
                else:
                    self._deploy[f] = self._split_tensors()
        return self

    def _split_tensors(self) -> dict:
        counts = self.centroid_counts.cpu()
        offsets = centroid_offsets(counts)
        kh, kw = self.kernel_size
        chans_list, weights, new_row = [], [], torch.empty(int(counts.sum()), dtype=torch.long)
        start = 0
        for q in torch.unique(counts).tolist():
            pos = torch.nonzero(counts == q).flatten()
            rows = (offsets[pos].unsqueeze(1) + torch.arange(q)).flatten()
            new_row[rows] = torch.arange(start, start + len(rows))
            start += len(rows)
            weights.append(self.centroids[rows.to(self.centroids.device)].reshape(len(rows), 1, kh, kw).contiguous())
            chans_list.append(None if len(pos) == len(counts) else pos.to(self.centroids.device))
        # fusion[n, m] = 1 when kernel n of some kept channel uses centroid (new) row m
        fusion = torch.zeros(self.out_channels, start, dtype=self.centroids.dtype)
        rows_by_n = new_row[self.assignment.cpu()].transpose(0, 1)  # [N, K]
        fusion.scatter_(1, rows_by_n, 1.0)
        return {"bucket_channels": chans_list, "bucket_weights": weights,
                "fusion": fusion.view(self.out_channels, start, 1, 1).to(self.centroids.device)}

    def _apply(self, fn, recurse=True):  # keep cached deploy tensors on the module's device/dtype
        super()._apply(fn, recurse)
        if self._epilogue is not None:
            scale, shift, relu = self._epilogue
            self._epilogue = (fn(scale), fn(shift), relu)
        if self.form != "train":
            form = self.form
            if "fused" in form and not fused.supports(self):  # e.g. .half(): the kernel is float32 only
                form = without_fused(form)
                warnings.warn(f"KSEConv2d: the fused form needs float32 centroids; {self.centroids.dtype} "
                              f"layers use {form!r} instead", RuntimeWarning, stacklevel=2)
            self.set_form(form)
        return self

    # ------------------------------------------------------------------ channel removal
    def remove_out_channels(self, remove: Sequence[int]) -> "KSEConv2d":
        """A copy without output channels ``remove``; unused centroids are dropped."""
        keep_out = [n for n in range(self.out_channels) if n not in set(remove)]
        assignment = self.assignment[:, keep_out]
        # compact: keep only centroid rows still referenced, preserving order
        used = torch.zeros(len(self.centroids), dtype=torch.bool, device=assignment.device)
        used[assignment.flatten()] = True
        new_index = torch.cumsum(used.long(), 0) - 1
        owner = torch.repeat_interleave(torch.arange(len(self.kept_channels), device=assignment.device),
                                        self.centroid_counts)
        counts = torch.zeros(len(self.kept_channels), dtype=torch.long, device=assignment.device)
        counts.index_add_(0, owner[used], torch.ones(int(used.sum()), dtype=torch.long, device=assignment.device))
        layer = KSEConv2d(self.in_channels, len(keep_out), self.kernel_size, self.stride, self.padding,
                          self.dilation, self.bias is not None, self.kept_channels.clone(), counts.cpu())
        layer = layer.to(self.centroids.device, self.centroids.dtype)
        with torch.no_grad():
            layer.centroids.copy_(self.centroids[used])
            layer.assignment.copy_(new_index[assignment])
            if self.bias is not None:
                layer.bias.copy_(self.bias[keep_out])
        return layer.set_form(self.form)

    def remove_in_channels(self, remove: Sequence[int]) -> "KSEConv2d":
        """A copy reading ``in_channels - len(remove)`` maps; every removed channel must be one
        this layer already skips (``q_c = 0``), so the function is unchanged."""
        remove_set = set(int(r) for r in remove)
        kept = self.kept_channels.tolist()
        clash = remove_set.intersection(kept)
        if clash:
            raise ValueError(f"cannot remove input channels {sorted(clash)}: the layer still reads them")
        remaining = [c for c in range(self.in_channels) if c not in remove_set]
        position = {c: i for i, c in enumerate(remaining)}
        layer = KSEConv2d(len(remaining), self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, self.bias is not None, torch.tensor([position[c] for c in kept], dtype=torch.long),
                          self.centroid_counts.cpu().clone())
        layer = layer.to(self.centroids.device, self.centroids.dtype)
        layer.load_state_dict({**self.state_dict(), "kept_channels": layer.kept_channels})
        return layer.set_form(self.form)

    # ------------------------------------------------------------------ storage
    def local_assignment(self) -> Tensor:
        """``LongTensor[C_kept, N]``: each kernel's centroid index within its own channel."""
        return self.assignment - centroid_offsets(self.centroid_counts).unsqueeze(1)

    def index_bit_widths(self) -> list:
        """Bits per stored index, per kept channel: 0 when q = 1, or when a channel kept whole
        maps kernel n to centroid n; else ceil(log2 q)."""
        local = self.local_assignment()
        identity = torch.arange(self.out_channels, device=local.device)
        widths = []
        for j, q in enumerate(self.centroid_counts.tolist()):
            if q == 1 or (q == self.out_channels and torch.equal(local[j], identity)):
                widths.append(0)
            else:
                widths.append(math.ceil(math.log2(q)))
        return widths

    # ------------------------------------------------------------------ reporting
    def dense_params(self) -> int:
        kh, kw = self.kernel_size
        return self.out_channels * self.in_channels * kh * kw

    def compression_ratio(self) -> float:
        """Dense kernel parameters / centroid parameters (bias excluded)."""
        return self.dense_params() / max(self.centroids.numel(), 1)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        return (s + f", kept={len(self.kept_channels)}/{self.in_channels}, centroids={len(self.centroids)}, "
                f"ratio={self.compression_ratio():.2f}x, form={self.form}")
