"""Counting: parameters, multiply-accumulates (MACs) and stored size of a model.

Standard layers are counted by PyTorch's own ``torch.utils.flop_counter.FlopCounterMode``
(one MAC = 2 FLOPs; convolutions and matrix products, as the usual "FLOPs" tables count).
KSE layers are counted as in the paper's deployment (docs/method.md §7, Fig. 2):

    2D part    sum_c q_c * kh * kw * H'W'      multiply-accumulates
    fusion     N * (C_kept - 1) * H'W'         additions (reported separately)

Stored size: every parameter and floating buffer at its dtype's width, plus the KSE indices
packed in ``ceil(log2 q_c)`` bits each (none for ``q_c = 1`` or for a channel kept whole) and
one bit per input channel for the kept-channel mask.

Example::

    >>> import kse
    >>> from kse.models import get_model
    >>> p = kse.profile(get_model("resnet56"), (3, 32, 32))
    >>> round(p.macs / 1e6), round(p.params / 1e6, 2)
    (125, 0.85)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .conv import KSEConv2d
from .serialization import index_bit_widths
from .module_utils import eval_mode


@dataclass
class LayerRow:
    name: str
    kind: str
    params: int
    macs: int
    fusion_adds: int = 0
    dense_macs: int = 0  # the same layer as a dense conv over all its input channels
    stored_bits: int = 0
    detail: str = ""


@dataclass
class Profile:
    """Totals and per-layer rows; ``macs`` excludes the KSE fusion additions (``fusion_adds``)."""

    params: int
    macs: int
    fusion_adds: int
    stored_bits: int
    rows: List[LayerRow] = field(default_factory=list)

    @property
    def stored_bytes(self) -> int:
        return math.ceil(self.stored_bits / 8)

    def as_dict(self) -> Dict:
        return {"params": self.params, "macs": self.macs, "fusion_adds": self.fusion_adds,
                "stored_bytes": self.stored_bytes,
                "rows": [r.__dict__ for r in self.rows]}


def kse_layer_bits(layer: KSEConv2d) -> int:
    """Stored bits of a KSE layer: centroids, bias, packed indices, kept-channel mask."""
    width = layer.centroids.element_size() * 8
    bits = layer.centroids.numel() * width + layer.in_channels
    if layer.bias is not None:
        bits += layer.bias.numel() * width
    return bits + layer.out_channels * sum(index_bit_widths(layer))


def _own_tensor_bits(m: nn.Module) -> int:
    bits = sum(p.numel() * p.element_size() * 8 for p in m.parameters(recurse=False))
    return bits + sum(b.numel() * b.element_size() * 8 for b in m.buffers(recurse=False) if b.is_floating_point())


@torch.no_grad()
def profile(model: nn.Module, input_size: Sequence[int], device: Optional[torch.device] = None) -> Profile:
    """Count ``model`` on one input of shape ``input_size = (C, H, W)`` (batch 1).

    The model is run once in eval mode (its training mode is restored afterwards).
    """
    if len(tuple(input_size)) != 3:
        raise ValueError(f"input_size must be (C, H, W), got {tuple(input_size)!r}")
    p = next(model.parameters(), None)
    device = device or (p.device if p is not None else torch.device("cpu"))
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    x = torch.randn(1, *input_size, device=device, dtype=dtype)

    out_shapes: Dict[str, Tuple[int, ...]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, KSEConv2d):
            hooks.append(m.register_forward_hook(lambda mod, i, o, n=name: out_shapes.__setitem__(n, tuple(o.shape))))
    try:
        with eval_mode(model), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def counted(name: str) -> int:
        return int(sum(counts.get(f"{root}.{name}" if name else root, {}).values())) // 2

    rows: List[LayerRow] = []
    total_macs = int(counter.get_total_flops()) // 2
    fusion_total = 0
    stored = 0
    for name, m in model.named_modules():
        if isinstance(m, KSEConv2d):
            n_out, h_out, w_out = out_shapes.get(name, (1, m.out_channels, 0, 0))[1:]
            kh, kw = m.kernel_size
            hw = h_out * w_out
            macs = int(m.centroid_counts.sum()) * kh * kw * hw
            fusion = m.out_channels * max(len(m.kept_channels) - 1, 0) * hw
            dense = m.out_channels * m.in_channels * kh * kw * hw
            total_macs += macs - counted(name)  # replace the dense-weight count of the training form
            fusion_total += fusion
            bits = kse_layer_bits(m)
            stored += bits
            rows.append(LayerRow(name, "KSEConv2d", sum(t.numel() for t in m.parameters()), macs, fusion, dense, bits,
                                 f"kept {len(m.kept_channels)}/{m.in_channels}, {len(m.centroids)} centroids"))
        else:
            bits = _own_tensor_bits(m)  # every module's own tensors, leaf or not
            stored += bits
            if not any(True for _ in m.children()):
                params = sum(t.numel() for t in m.parameters(recurse=False))
                macs = counted(name)
                if params or macs:
                    rows.append(LayerRow(name, type(m).__name__, params, macs, 0, macs, bits))
    params = sum(t.numel() for t in model.parameters())
    return Profile(params, total_macs, fusion_total, stored, rows)
