"""What the network does with each input feature map of a convolution, measured on images.

KSE (Li et al., "Exploiting Kernel Sparsity and Entropy for Interpretable CNN Compression",
CVPR 2019) scores input feature map c of a convolution from its weights alone (Eqs. 4-7).
This module measures, on real images, what :mod:`kse.explain` compares that score with:

* **ablation importance** (exact): the input map c of one convolution is set to zero, as seen
  by that convolution only (a residual shortcut reading the same tensor keeps it, as KSE's
  pruning does), everything else is kept, and the network is run to its output:

      loss_increase[c] = mean_i CE(f_{-c}(x_i), y_i) - mean_i CE(f(x_i), y_i)
      top1_drop[c]     = 100 * (mean_i [argmax f(x_i) = y_i] - mean_i [argmax f_{-c}(x_i) = y_i])

* **first-order Taylor estimate** (Molchanov et al., ICLR 2017): with ``a = x_i[c]`` the map
  as the convolution reads it and ``g`` the gradient of image i's loss with respect to it,

      taylor[c] = mean_i | sum_{h,w} a[h, w] * g[h, w] |

  (one forward and one backward pass per batch, all layers at once);

* **mean absolute activation**: ``mean_{i,h,w} |x_i[c, h, w]|``.

The exact ablation costs one run of the network *from that convolution onwards* per channel.
``ablation_importance`` traces the model with ``torch.fx`` (BatchNorm folded into the
convolutions, :func:`kse.fold_batchnorm`), runs it once on the images and keeps, for every
layer, the values that the rest of the network reads from before the layer (the layer's input,
a residual shortcut's input); then, per layer, it re-runs only the nodes that depend on the
layer, on a batch of ``K`` copies of the images, copy k with channel ``c_k`` zeroed. The
layers before the convolution are never recomputed. A model ``torch.fx`` cannot trace falls
back to the obvious method (a forward pre-hook zeroes the channel, the whole model is re-run
per channel), which is also the reference the tests compare with.

Example::

    >>> import torch, kse
    >>> from kse.ablation import ablation_importance
    >>> net = kse.models.get_model("resnet20", num_classes=10).eval()
    >>> x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    >>> imp = ablation_importance(net, ["layer1.0.conv1"], x, y)
    >>> imp["layer1.0.conv1"].loss_increase.shape
    torch.Size([16])
"""

from __future__ import annotations

import math
import operator
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .fold import fold_batchnorm
from .module_utils import eval_mode

# Rows (image copies) per forward of the rest of the network: more amortise the per-operation
# cost, fewer keep the activations in cache (and a 16 x 28 x 28 float map x 512 rows, 25 MiB,
# under glibc's largest mmap threshold, so freed activations are reused rather than mapped
# afresh); benchmarks/explain_ablation.py --rows compares row counts
DEFAULT_ROWS = 512

Progress = Optional[Callable[[str], None]]


@dataclass
class Ablation:
    """Exact ablation importance of the input channels of one convolution."""

    name: str
    loss_increase: Tensor  # [C] float64: mean CE with channel c zeroed minus the intact model's
    top1_drop: Tensor  # [C] float64: percentage points of top-1 lost with channel c zeroed
    base_loss: float
    base_top1: float
    # [2, C]: loss_increase on the images of even and of odd index alone (how reproducible it is)
    loss_increase_halves: Optional[Tensor] = None


def _check_images(images: Tensor, labels: Tensor) -> None:
    if not torch.is_tensor(images) or images.ndim < 2:
        raise TypeError(f"images must be a Tensor[B, ...], got {type(images).__name__}")
    if len(images) < 1:
        raise ValueError("at least one image is needed (got an empty batch)")
    if not torch.is_tensor(labels) or labels.shape != (len(images),):
        raise ValueError(f"labels must be a Tensor[{len(images)}] of class indices, got "
                         f"{tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__}")


def _check_layers(model: nn.Module, names: Sequence[str]) -> List[nn.Conv2d]:
    if not names:
        raise ValueError("no layer to explain: names is empty")
    convs = []
    for name in names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"layer {name!r} is not in the model") from None
        if not isinstance(m, nn.Conv2d):
            raise TypeError(f"layer {name!r} must be an nn.Conv2d, got {type(m).__name__}")
        convs.append(m)
    return convs


def _logits(out) -> Tensor:
    if not torch.is_tensor(out) or out.ndim != 2:
        raise ValueError("the model must return logits Tensor[B, classes]; got "
                         f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}")
    return out if out.dtype == torch.float64 else out.float()


def _loss_correct(logits: Tensor, labels: Tensor, copies: int, first: int = 0) -> Tuple[Tensor, Tensor]:
    """``(ce [copies, 2], correct [copies])``: for each of ``copies`` stacked copies of the
    batch, the summed cross-entropy over the images of even and of odd index (``first``: the
    index of the batch's first image) and the number classified correctly."""
    y = labels.repeat(copies)
    ce = F.cross_entropy(logits, y, reduction="none").double().view(copies, -1)
    odd = ((torch.arange(len(labels), device=ce.device) + first) % 2).bool()
    halves = torch.stack([ce[:, ~odd].sum(1), ce[:, odd].sum(1)], 1)
    correct = (logits.argmax(1) == y).double().view(copies, -1).sum(1)
    return halves.cpu(), correct.cpu()


def _result(name: str, ce: Tensor, correct: Tensor, base_ce: Tensor, base_correct: float, total: int) -> "Ablation":
    """``Ablation`` from summed CE ``ce [C, 2]`` (even / odd images) and correct counts ``[C]``."""
    halves = torch.tensor([(total + 1) // 2, total // 2], dtype=torch.float64)
    base_loss = float(base_ce.sum()) / total
    per_half = ce / halves.clamp_min(1) - base_ce / halves.clamp_min(1)
    return Ablation(name, ce.sum(1) / total - base_loss, 100 * (base_correct - correct) / total, base_loss,
                    100 * base_correct / total, per_half.t().contiguous())


def _chunks(n: int, size: int):
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)


def _say(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


def stderr_progress(msg: str) -> None:
    """A ``progress`` callback that prints to stderr."""
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- reference
def ablation_importance_hooks(model: nn.Module, names: Sequence[str], images: Tensor, labels: Tensor,
                              batch_size: int = 256, progress: Progress = None) -> Dict[str, Ablation]:
    """The obvious method: a forward pre-hook zeroes input channel c of the layer and the
    whole model is re-run, once per channel. Exact and slow; the reference for the fast path."""
    _check_images(images, labels)
    convs = _check_layers(model, names)
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    total = len(images)

    def run(hook_layer: Optional[nn.Module] = None, channel: int = 0) -> Tuple[Tensor, float]:
        handle = None
        if hook_layer is not None:
            def zero(mod, args):
                x = args[0].clone()
                x[:, channel] = 0
                return (x,) + tuple(args[1:])
            handle = hook_layer.register_forward_pre_hook(zero)
        try:
            ce, correct = torch.zeros(2, dtype=torch.float64), 0.0
            for lo, hi in _chunks(total, batch_size):
                c, k = _loss_correct(_logits(model(images[lo:hi])), labels[lo:hi], 1, lo)
                ce, correct = ce + c[0], correct + k.item()
        finally:
            if handle is not None:
                handle.remove()
        return ce, correct

    result = {}
    with eval_mode(model), torch.no_grad():
        base_ce, base_correct = run()
        for i, (name, conv) in enumerate(zip(names, convs)):
            ce = torch.zeros(conv.in_channels, 2, dtype=torch.float64)
            correct = torch.zeros(conv.in_channels, dtype=torch.float64)
            for c in range(conv.in_channels):
                ce[c], correct[c] = run(conv, c)
            result[name] = _result(name, ce, correct, base_ce, base_correct, total)
            _say(progress, f"ablation (hooks) [{i + 1}/{len(names)}] {name}")
    return result


# ----------------------------------------------------------------------------- fast path
class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .conv import KSEConv2d

        return type(m) is KSEConv2d or super().is_leaf_module(m, qualname)


class _Graph:
    """A traced model split, per layer, into the part before the layer and the part after."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.modules = dict(gm.named_modules())
        self.output = next(n for n in self.nodes if n.op == "output")
        self.batch: Set[fx.Node] = set()  # nodes whose value depends on the images
        for n in self.nodes:
            if n.op == "placeholder" or any(a in self.batch for a in n.all_input_nodes):
                self.batch.add(n)

    def conv_node(self, name: str) -> fx.Node:
        calls = [n for n in self.nodes if n.op == "call_module" and n.target == name]
        if len(calls) != 1:
            raise ValueError(f"layer {name!r} is called {len(calls)} times in the traced graph; ablating one "
                             "input map needs a layer that runs once")
        if len(calls[0].args) != 1 or calls[0].kwargs or not isinstance(calls[0].args[0], fx.Node):
            raise ValueError(f"layer {name!r} must be called with one input tensor")
        return calls[0]

    def plan(self, conv: fx.Node, is_tensor: Dict[fx.Node, bool]) -> Tuple[List[fx.Node], List[fx.Node]]:
        """``(rerun, frontier)``: the nodes after ``conv`` to re-run when its output changes (in
        order), and the nodes before it whose values they read."""
        rerun = {conv}
        for n in self.nodes[self.index[conv] + 1:]:
            if any(a in rerun for a in n.all_input_nodes):
                rerun.add(n)
        # values computed from the images that are not tensors (x.shape, x.size(0)) are
        # recomputed from the copies, so that a batch size read before the layer stays right
        stack = list(rerun)
        while stack:
            for a in stack.pop().all_input_nodes:
                if a not in rerun and a in self.batch and not is_tensor[a]:
                    rerun.add(a)
                    stack.append(a)
        rerun.discard(conv)  # computed from the ablated input
        frontier = {a for n in rerun for a in n.all_input_nodes if a not in rerun and a is not conv}
        order = lambda ns: sorted(ns, key=self.index.__getitem__)  # noqa: E731
        return order(rerun), order(frontier)

    def _is_relu(self, n: fx.Node) -> bool:
        if n.op == "call_module":
            return type(self.modules[n.target]) is nn.ReLU
        if n.op == "call_function":
            return n.target in (F.relu, torch.relu)
        return n.op == "call_method" and n.target == "relu"

    def _is_add(self, n: fx.Node) -> bool:
        return (n.op == "call_function" and n.target in (operator.add, torch.add) and not n.kwargs) or (
            n.op == "call_method" and n.target == "add" and not n.kwargs)

    def run(self, nodes: Sequence[fx.Node], env: Dict[fx.Node, object], keep: Set[fx.Node] = frozenset(),
            owned: Sequence[fx.Node] = ()):
        """Run ``nodes`` in order; values not needed any more are freed except those in ``keep``.

        A ReLU, or an addition, whose (left) input was computed here and is read by nothing
        after it works in place (same values; on a large batch, allocating a fresh output
        costs as much as the operation). ``owned``: nodes of ``env`` computed by the caller for
        this run alone (they may be overwritten)."""
        last_use: Dict[fx.Node, fx.Node] = {}
        for n in nodes:
            for a in n.all_input_nodes:
                last_use[a] = n
        owned = set(owned)

        def dies_here(a, n: fx.Node) -> bool:
            if not (isinstance(a, fx.Node) and a in owned and last_use.get(a) is n and a not in keep):
                return False
            t = env.get(a)
            # not a view, and no live value is a view of it
            return (torch.is_tensor(t) and t._base is None and sum(1 for x in n.all_input_nodes if x is a) == 1
                    and not any(torch.is_tensor(v) and v._base is t for v in env.values()))

        out = None
        for n in nodes:
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
            if n.op == "placeholder":
                value = env[n]
            elif n.op == "get_attr":
                value = self.gm
                for part in n.target.split("."):
                    value = getattr(value, part)
            elif self._is_relu(n) and len(n.args) == 1 and dies_here(n.args[0], n):
                value = args[0].relu_()
            elif (self._is_add(n) and len(n.args) == 2 and dies_here(n.args[0], n) and torch.is_tensor(args[1])
                  and args[1].shape == args[0].shape and args[1].dtype == args[0].dtype):
                value = args[0].add_(args[1])
            elif n.op == "call_module":
                value = self.modules[n.target](*args, **kwargs)
            elif n.op == "call_function":
                value = n.target(*args, **kwargs)
            elif n.op == "call_method":
                value = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:  # output
                out = args[0]
                continue
            env[n] = value
            owned.add(n)
            for a in n.all_input_nodes:
                if last_use.get(a) is n and a not in keep:
                    env.pop(a, None)
        return out


def _map_threads(fn: Callable, items: Sequence, workers: int):
    """``map(fn, items)`` yielding results as they finish, on ``workers`` threads of one
    intra-op thread each (PyTorch releases the GIL in its operations)."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(fn, item) for item in items]
            for future in as_completed(futures):
                yield future.result()
    finally:
        torch.set_num_threads(threads)


def _trace(model: nn.Module) -> Optional[fx.GraphModule]:
    try:
        return fold_batchnorm(model)
    except ValueError:
        return None


def _copies(value, copies: int, batch: int, memory_format):
    """``copies`` stacked copies of a per-image value (along dim 0); anything else as it is."""
    if not torch.is_tensor(value):
        return value
    if value.ndim == 0 or value.shape[0] != batch:
        raise ValueError(f"a value the rest of the network reads has shape {tuple(value.shape)}, not a batch of "
                         f"{batch} along dim 0")
    out = torch.cat([value] * copies) if copies > 1 else value
    return out.contiguous(memory_format=memory_format) if out.ndim == 4 else out


def ablation_importance(model: nn.Module, names: Sequence[str], images: Tensor, labels: Tensor,
                        rows: int = DEFAULT_ROWS, progress: Progress = None, method: str = "auto",
                        channels_last: Optional[bool] = None, workers: Optional[int] = None) -> Dict[str, Ablation]:
    """Exact ablation importance of every input channel of the convolutions ``names``.

    Args:
        model: the network (its mode is restored afterwards; it runs in eval mode).
        names: dotted names of ``nn.Conv2d`` layers.
        images: ``Tensor[B, C, H, W]`` (preprocessed); labels: ``LongTensor[B]``.
        rows: image copies per forward of the rest of the network (channels x images); bounds
            memory (about ``rows`` times one image's largest activations, a few times over).
        progress: called with a line of text after each layer.
        method: ``"fx"`` (trace, re-run only what follows the layer), ``"hooks"`` (re-run the
            whole model per channel) or ``"auto"`` (fx where the model traces, else hooks).
        channels_last: run in channels-last memory format (default: on CPU).
        workers: layers run at the same time, each on one intra-op thread (default: on CPU,
            ``torch.get_num_threads()``; 1 on a GPU). On a busy machine this uses the cores
            better than one layer on several threads, whose workers wait for each other.
    Returns:
        ``{name: Ablation}``.
    """
    _check_images(images, labels)
    convs = _check_layers(model, names)
    if method not in ("auto", "fx", "hooks"):
        raise ValueError(f"method must be 'auto', 'fx' or 'hooks', got {method!r}")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ValueError(f"rows must be an integer >= 1, got {rows!r}")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    gm = None if method == "hooks" else _trace(model)
    if gm is None:
        if method == "fx":
            raise ValueError(f"torch.fx cannot trace {type(model).__name__}; use method='hooks'")
        if method == "auto":
            warnings.warn(f"torch.fx cannot trace {type(model).__name__}: the ablation re-runs the whole model "
                          "for every channel (slow)", RuntimeWarning)
        return ablation_importance_hooks(model, names, images, labels, max(1, rows // 4), progress)
    device = next(model.parameters()).device
    if channels_last is None:
        channels_last = device.type == "cpu"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gm = gm.to(device=device, memory_format=fmt)
    graph = _Graph(gm)
    images, labels = images.to(device), labels.to(device)
    placeholder = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholder) != 1:
        raise ValueError(f"the model must take one input tensor, its traced graph has {len(placeholder)}")
    conv_nodes = [graph.conv_node(name) for name in names]

    with torch.inference_mode():
        # which values are tensors (a probe on two images), then what each layer needs
        probe: Dict[fx.Node, object] = {placeholder[0]: images[:2].contiguous(memory_format=fmt)}
        graph.run(graph.nodes, probe, keep=set(graph.nodes))
        is_tensor = {n: torch.is_tensor(probe.get(n)) for n in graph.nodes}
        del probe
        plans = [graph.plan(c, is_tensor) for c in conv_nodes]
        keep = set().union(*(f for _, f in plans)) | {c.args[0] for c in conv_nodes}
        # work per layer, for the progress estimate: channels x convolutions re-run
        work = [conv.in_channels * sum(1 for n in r if n.op == "call_module") for conv, (r, _) in zip(convs, plans)]

        total = len(images)
        img_chunk = min(total, rows)
        copies_max = max(1, rows // img_chunk)
        loss = [torch.zeros(c.in_channels, 2, dtype=torch.float64) for c in convs]
        correct = [torch.zeros(c.in_channels, dtype=torch.float64) for c in convs]
        base_ce, base_correct = torch.zeros(2, dtype=torch.float64), 0.0
        t0, done, finished = time.time(), 0, 0
        n_chunks = math.ceil(total / img_chunk)
        if workers is None:
            workers = torch.get_num_threads() if device.type == "cpu" else 1
        for lo, hi in _chunks(total, img_chunk):
            x, y = images[lo:hi].contiguous(memory_format=fmt), labels[lo:hi]
            env: Dict[fx.Node, object] = {placeholder[0]: x}
            logits = _logits(graph.run(graph.nodes, env, keep))
            c, k = _loss_correct(logits, y, 1, lo)
            base_ce, base_correct = base_ce + c[0], base_correct + k.item()
            saved = {n: env[n] for n in keep}
            del env

            def one_layer(li: int) -> int:
                conv, conv_node, (rerun, frontier) = convs[li], conv_nodes[li], plans[li]
                source = conv_node.args[0]
                with torch.inference_mode():  # per thread
                    for c_lo, c_hi in _chunks(conv.in_channels, copies_max):
                        K = c_hi - c_lo
                        sub = {n: _copies(saved[n], K, len(x), fmt) if n in graph.batch else saved[n]
                               for n in frontier}
                        # the layer reads copy k of its input with channel c_lo + k zeroed; every
                        # other reader (a residual shortcut) gets the intact copies
                        inp = _copies(saved[source], K, len(x), fmt)
                        inp = inp.clone(memory_format=fmt) if K == 1 else inp
                        view = inp.view(K, len(x), *inp.shape[1:])
                        for k in range(K):
                            view[k, :, c_lo + k] = 0
                        sub[conv_node] = graph.modules[conv_node.target](inp)
                        del inp, view
                        out = _logits(graph.run(rerun, sub, owned=(conv_node,)))
                        c, k = _loss_correct(out, y, K, lo)
                        loss[li][c_lo:c_hi] += c
                        correct[li][c_lo:c_hi] += k
                return li

            # the largest layers first, so that the workers finish together
            order = sorted(range(len(names)), key=lambda i: -work[i])
            for li in _map_threads(one_layer, order, workers):
                done += work[li] * (hi - lo)
                finished += 1
                frac = done / (sum(work) * total)
                spent = time.time() - t0
                _say(progress, f"ablation [{finished}/{len(names) * n_chunks}] {names[li]}: {convs[li].in_channels} "
                               f"channels; {100 * frac:.0f}% in {spent:.0f}s, about "
                               f"{spent / max(frac, 1e-9) - spent:.0f}s left")
    return {name: _result(name, loss[i], correct[i], base_ce, base_correct, total) for i, name in enumerate(names)}


# ----------------------------------------------------------------------------- gradients
def taylor_importance(model: nn.Module, names: Sequence[str], images: Tensor, labels: Tensor,
                      batch_size: int = 128) -> Dict[str, Dict[str, Tensor]]:
    """First-order Taylor estimate and mean absolute activation of every input channel.

    With ``a = x_i[c]``, the map that convolution ``name`` reads for image i, and ``g`` the
    gradient of image i's cross-entropy with respect to it (as read by that convolution; a
    shortcut reading the same tensor does not count):

        taylor[c]     = mean_i | sum_{h,w} a[h, w] * g[h, w] |
        activation[c] = mean_{i,h,w} | a[h, w] |

    ``|sum a g|`` is the first-order estimate of the loss change when the map is set to zero.
    One forward and one backward pass per batch of ``batch_size`` images serve every layer; the
    model's parameters and their ``.grad`` are left as they are.

    Returns ``{name: {"taylor": Tensor[C], "activation": Tensor[C]}}`` (float64).
    """
    _check_images(images, labels)
    convs = _check_layers(model, names)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    device = next(model.parameters()).device
    taylor = {n: torch.zeros(c.in_channels, dtype=torch.float64) for n, c in zip(names, convs)}
    activation = {n: torch.zeros(c.in_channels, dtype=torch.float64) for n, c in zip(names, convs)}

    def hook(name: str):
        def pre(mod, args):
            a = args[0]
            seen = a.view_as(a)  # this layer's own use of the tensor: its gradient alone

            def on_grad(g: Tensor) -> None:
                taylor[name] += (a.detach() * g).sum((2, 3)).abs().sum(0).double().cpu()

            seen.register_hook(on_grad)
            activation[name] += a.detach().abs().mean((2, 3)).sum(0).double().cpu()
            return (seen,) + tuple(args[1:])
        return pre

    handles = [conv.register_forward_pre_hook(hook(n)) for n, conv in zip(names, convs)]
    try:
        with eval_mode(model), torch.enable_grad():
            for lo, hi in _chunks(len(images), batch_size):
                x = images[lo:hi].to(device).requires_grad_(True)
                loss = F.cross_entropy(_logits(model(x)), labels[lo:hi].to(device), reduction="sum")
                torch.autograd.grad(loss, x)  # parameters' .grad untouched
    finally:
        for h in handles:
            h.remove()
    n = len(images)
    return {name: {"taylor": taylor[name] / n, "activation": activation[name] / n} for name in names}
