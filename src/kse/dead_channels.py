"""Exact removal of dead channels after KSE.

When every layer that reads feature map c of a producer convolution has dropped it
(``q_c = 0``), the producer's output channel c (and its BatchNorm channel) computes something
nobody reads: remove it, and the model really gets smaller with the very same outputs.

Who reads what comes from Torch-Pruning's ``DependencyGraph`` (its pruning groups follow
concatenations, splits and residual sums). A channel is removed only where that is exact:
every item of its group must be the producer or a residual partner (``Conv2d`` output,
groups == 1), a ``BatchNorm2d``, a whitelisted channel-wise operation (ReLU, add, pooling ...),
a concat/split, or a KSE reader that skips that channel. Anything else (a ``Linear``, the
network output, an unknown operation such as the zero-padding of an option-A shortcut) keeps
the channel.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Set, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .module_utils import eval_mode

# grad_fn names (without "Backward<n>") of operations that act on each channel separately
_CHANNELWISE_OPS = {
    "Relu", "Add", "Sub", "Mul", "Hardtanh", "Sigmoid", "Silu", "Gelu", "Hardswish", "Hardsigmoid",
    "LeakyRelu", "Elu", "Tanh", "Mish", "Clamp", "ClampMin", "Threshold", "MaxPool2DWithIndices",
    "AvgPool2D", "AdaptiveAvgPool2D", "AdaptiveMaxPool2D", "NativeDropout", "Clone", "Mean", "Prelu",
}

Removal = Dict[str, Dict[str, Set[int]]]  # module name -> {"out": {...}, "in": {...}}


def _op_name(op) -> str:
    fn = getattr(op, "_grad_fn", None)
    name = fn if isinstance(fn, str) else type(fn).__name__ if fn is not None else ""
    return re.sub(r"Backward\d*$", "", name)


def find_dead_channels(model: nn.Module, counts: Dict[str, Tensor], example_inputs: Tensor,
                       channel_multiple: int = 1) -> Removal:
    """Channels that can be removed exactly, per module.

    Args:
        model: the *dense* model (before KSE layers are swapped in); not modified.
        counts: centroid counts ``LongTensor[C_in]`` of each layer to compress, by name.
        example_inputs: a batch the model accepts (used to trace the graph, in eval mode).
        channel_multiple: keep every shrunk producer's width a multiple of this (a few dead
            channels stay, which is exact too) where its width was one: kernels for widths
            such as 13 or 29 run slower than for 16 or 32 (measured in
            benchmarks/train_step.py, ``--channel-multiple 1`` against the default).
    Returns:
        ``{module_name: {"out": channels, "in": channels}}``: output channels to remove from
        convolutions / BatchNorms, and input channels to remove from KSE layers.
    """
    graph = ChannelGraph.build(model, example_inputs)
    return graph.dead_channels(counts, channel_multiple) if graph is not None else {}


class ChannelGraph:
    """Who reads each producer's output channels, traced once; :meth:`dead_channels` then
    answers for any centroid counts without tracing again (a budget search asks for many).

    Build it with :meth:`build` (``None`` when Torch-Pruning cannot map the graph, with a
    RuntimeWarning saying so)."""

    def __init__(self, groups: List[dict]) -> None:
        self.groups = groups

    @classmethod
    def build(cls, model: nn.Module, example_inputs: Tensor) -> Optional["ChannelGraph"]:
        import torch_pruning as tp
        from torch_pruning import ops as tp_ops

        names = {m: n for n, m in model.named_modules()}
        try:  # Torch-Pruning's part: the graph and the pruning group of every producer
            with eval_mode(model):
                graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
            producers = [m for m in model.modules()
                         if type(m) is nn.Conv2d and m.groups == 1 and m in graph.module2node]
            groups = [(m, graph.get_pruning_group(m, tp.prune_conv_out_channels, idxs=list(range(m.out_channels))))
                      for m in producers]
        except Exception as exc:  # noqa: BLE001 - a graph Torch-Pruning cannot map: remove nothing, say so
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            warnings.warn(f"dead channels not removed: Torch-Pruning could not map this model's graph "
                          f"({type(exc).__name__}: {first}); the compressed model computes the same function "
                          "with zero kernels for them (a smaller speed-up); remove_dead_channels=False skips "
                          "this step", RuntimeWarning, stacklevel=3)
            return None

        summaries: List[dict] = []
        seen_groups: Set[Tuple] = set()
        for producer, group in groups:
            key = tuple(sorted((str(names.get(it.dep.target.module, id(it.dep.target.module))),
                                it.dep.handler.__name__, tuple(int(i) for i in it.idxs)) for it in group.items))
            if key in seen_groups:
                continue
            seen_groups.add(key)
            width = producer.out_channels
            blocked = np.zeros(width, dtype=bool)  # root channels that some item always needs
            outs: List[Tuple[str, np.ndarray, np.ndarray]] = []  # (module, its channels, their roots)
            readers: List[Tuple[str, np.ndarray, np.ndarray]] = []  # plain convs: KSE readers if compressed
            for item in group.items:
                target, handler = item.dep.target.module, item.dep.handler.__name__
                idx = np.asarray([int(i) for i in item.idxs], dtype=np.int64)
                roots = np.asarray([int(r) for r in item.root_idxs], dtype=np.int64)
                node = graph.module2node.get(target)
                if handler == "prune_out_channels" and node is not None and not node.outputs:
                    blocked[roots] = True  # this output is the network's output: always read
                    continue
                if isinstance(target, (tp_ops._ConcatOp, tp_ops._SplitOp)):
                    continue  # Torch-Pruning maps the channel indices through these
                if isinstance(target, tp_ops._ElementWiseOp):
                    if _op_name(target) not in _CHANNELWISE_OPS:
                        blocked[roots] = True
                    continue
                name = names.get(target)
                if type(target) is nn.Conv2d and target.groups == 1 and handler == "prune_out_channels":
                    outs.append((name, idx, roots))
                elif type(target) is nn.BatchNorm2d and handler == "prune_out_channels":
                    outs.append((name, idx, roots))
                elif type(target) is nn.Conv2d and target.groups == 1 and handler == "prune_in_channels":
                    readers.append((name, idx, roots))
                else:  # a Linear, the network output, another op (reshape, slice, pad ...): keep
                    blocked[roots] = True
            summaries.append({"producer": names.get(producer), "width": width, "blocked": blocked,
                              "outs": outs, "readers": readers})
        return cls(summaries)

    def dead_channels(self, counts: Dict[str, Tensor], channel_multiple: int = 1) -> Removal:
        """What :func:`find_dead_channels` answers for ``counts`` (the layers to compress)."""
        q_of = {name: torch.as_tensor(q).cpu().numpy() for name, q in counts.items()}
        removal: Removal = defaultdict(lambda: {"out": set(), "in": set()})
        for g in self.groups:
            blocked = g["blocked"].copy()
            plan = [(name, "out", idx, roots) for name, idx, roots in g["outs"]]
            for name, idx, roots in g["readers"]:
                q = q_of.get(name)
                if q is None:  # read by a layer that stays dense
                    blocked[roots] = True
                    continue
                reads = idx >= len(q)
                reads[~reads] = q[idx[~reads]] != 0
                blocked[roots[reads]] = True
                plan.append((name, "in", idx, roots))
            if channel_multiple > 1:
                blocked[_roots_to_keep_for_width(g["width"], plan, blocked, g["producer"], channel_multiple)] = True
            for name, kind, idx, roots in plan:
                chosen = idx[~blocked[roots]]
                if len(chosen):
                    removal[name][kind] |= set(chosen.tolist())
        return {n: v for n, v in removal.items() if v["out"] or v["in"]}


def _roots_to_keep_for_width(width: int, plan, blocked: np.ndarray, producer: str, multiple: int) -> List[int]:
    """Removable producer channels to keep so that ``width - removed`` stays a multiple of
    ``multiple`` (the highest-numbered ones; none when ``width`` is not a multiple itself)."""
    if width % multiple:
        return []
    own = np.zeros(width, dtype=bool)
    for name, kind, _, roots in plan:
        if name == producer and kind == "out":
            own[roots] = True
    removable = np.nonzero(own & ~blocked)[0]
    extra = (-(width - len(removable))) % multiple
    return removable[len(removable) - extra:].tolist() if extra else []


def shrink_batchnorm(bn: nn.BatchNorm2d, remove: Iterable[int]) -> nn.BatchNorm2d:
    """A copy of ``bn`` without channels ``remove``."""
    remove = set(remove)
    keep = torch.tensor([c for c in range(bn.num_features) if c not in remove], dtype=torch.long)
    ref = next(iter(list(bn.parameters()) + [b for b in bn.buffers() if b.is_floating_point()]), None)
    new = nn.BatchNorm2d(len(keep), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[keep])
            new.bias.copy_(bn.bias[keep])
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[keep])
            new.running_var.copy_(bn.running_var[keep])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def shrink_conv(conv: nn.Conv2d, remove_out: Iterable[int] = (), remove_in: Iterable[int] = ()) -> nn.Conv2d:
    """A copy of a dense ``conv`` without the given output / input channels (groups == 1)."""
    ro, ri = set(remove_out), set(remove_in)
    keep_out = [c for c in range(conv.out_channels) if c not in ro]
    keep_in = [c for c in range(conv.in_channels) if c not in ri]
    new = nn.Conv2d(len(keep_in), len(keep_out), conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    1, conv.bias is not None, conv.padding_mode).to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(conv.weight[keep_out][:, keep_in])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[keep_out])
    new.train(conv.training)
    return new
