"""Fold each eval-mode BatchNorm, and a ReLU right after it, into the convolution before it.

For inference and export: ``y = relu(gamma * (conv(x) - mean) / sqrt(var + eps) + beta)`` is one
convolution with the per-output-channel affine map ``s * conv(x) + t``, ``s = gamma / sqrt(var +
eps)``, ``t = beta - s * mean``, applied to its result. A dense ``nn.Conv2d`` gets it in its
weight and bias (what ``torch.jit.freeze`` does for TorchScript); a :class:`KSEConv2d` cannot put
``s`` into its centroids, which output channels share, so it keeps ``(s, t)`` as an epilogue: its
dense and full forms fold it into their weight, the fused kernel applies it (and the ReLU) as it
writes each output. Two operations per layer fewer, which matters most at small batch sizes.

The model is traced with ``torch.fx`` (KSE layers as leaves); a BatchNorm is folded only when
its input is a convolution read by nothing else and both are called from one place only, and a
ReLU only into a KSE layer whose BatchNorm was folded and whose result only that ReLU reads.
"""

from __future__ import annotations

import copy
from typing import Dict

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .conv import KSEConv2d
from .module_utils import set_module


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) is KSEConv2d or super().is_leaf_module(m, qualname)


def _is_relu(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def bn_affine(bn: nn.BatchNorm2d):
    """``(s, t)`` with ``bn(z) = s * z + t`` per channel in eval mode."""
    s = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight
    t = -bn.running_mean * s
    if bn.bias is not None:
        t = t + bn.bias
    return s.detach(), t.detach()


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """An eval-mode copy of ``model`` with BatchNorms (and ReLUs, into KSE layers) folded in.

    Raises ``ValueError`` naming the reason when ``torch.fx`` cannot trace the model (data-dependent
    control flow). The result computes the same function (float32 rounding aside); it cannot be
    saved with :func:`kse.save` (save the unfolded model), but traces and exports."""
    model = copy.deepcopy(model).eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds; one message names it
        raise ValueError(f"cannot fold BatchNorm: torch.fx could not trace {type(model).__name__} "
                         f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    gm = fx.GraphModule(model, graph)
    modules = dict(gm.named_modules())
    calls: Dict[str, int] = {}  # a module called from several places keeps its own function
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) is not nn.BatchNorm2d or bn.running_mean is None or len(node.args) != 1:
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if (type(conv) not in (nn.Conv2d, KSEConv2d) or len(src.users) != 1 or conv.out_channels != bn.num_features
                or calls[src.target] != 1 or calls[node.target] != 1):
            continue
        if type(conv) is nn.Conv2d:
            set_module(gm, src.target, fuse_conv_bn_eval(conv, bn))
        else:
            scale, shift = bn_affine(bn)
            users = list(node.users)
            relu = len(users) == 1 and _is_relu(users[0], modules) and users[0].args[0] is node
            conv.set_epilogue(scale, shift, relu)
            if relu:
                users[0].replace_all_uses_with(src)
                gm.graph.erase_node(users[0])
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm
