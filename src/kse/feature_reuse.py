"""DenseNet feature-reuse map from the KSE indicator (docs/method.md §3-4; paper Eqs. 7-8).

In a dense block, layer j reads the concatenation of the block's input and of the outputs of
layers 0..j-1. The KSE indicator scores each input channel of layer j's first convolution,
so grouping those channels by the layer that produced them says, from the weights alone,
which earlier features layer j still uses and which it ignores: the question Huang et al.
(DenseNet, CVPR 2017, Fig. 5) answered with the weights' L1 norms.

``feature_reuse(model, cfg)`` returns, per dense block, the mean indicator and the fraction of
channels KSE drops at ``cfg.G`` / ``cfg.T``, as matrices ``[layer j, source i]`` where source 0
is the block's input and source i >= 1 is layer i-1 (NaN where i > j). Dense blocks are found
by shape, so kse's ``densenet40`` and torchvision's DenseNets both work: a container whose
children read inputs of widths ``c0, c0 + g, c0 + 2g, ...`` with their first convolution and
write ``g`` channels with their last.

Example::

    >>> import kse
    >>> from kse.models import get_model
    >>> from kse.feature_reuse import feature_reuse
    >>> blocks = feature_reuse(get_model("densenet40"), kse.KSEConfig(G=6))
    >>> len(blocks), len(blocks[0].layers)
    (3, 12)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn

from .compress import plan
from .config import KSEConfig
from .conv import KSEConv2d

__all__ = ["DenseBlock", "BlockReuse", "find_dense_blocks", "feature_reuse", "plot_feature_reuse"]


@dataclass
class DenseBlock:
    """A dense block: ``layers[j]`` is the name of the convolution of layer j that reads the
    concatenation of ``block_input`` channels and ``j * growth`` channels of earlier layers."""

    name: str
    layers: List[str]
    block_input: int
    growth: int


@dataclass
class BlockReuse:
    """The feature-reuse map of one dense block (matrices indexed ``[layer j][source i]``)."""

    block: str
    layers: List[str]
    block_input: int
    growth: int
    mean_indicator: List[List[float]]
    dropped_fraction: List[List[float]]

    def to_dict(self) -> Dict[str, Any]:
        nan_to_none = [[None if math.isnan(v) else v for v in row] for row in self.mean_indicator]
        drop = [[None if math.isnan(v) else v for v in row] for row in self.dropped_fraction]
        return {**dataclasses.asdict(self), "mean_indicator": nan_to_none, "dropped_fraction": drop,
                "sources": ["block input"] + [f"layer {i}" for i in range(len(self.layers))]}


def find_dense_blocks(model: nn.Module) -> List[DenseBlock]:
    """Every dense block of ``model``, found by shape (see the module docstring)."""
    blocks = []
    for name, container in model.named_modules():
        children = list(container.named_children())
        if len(children) < 2:
            continue
        firsts, lasts, names = [], [], []
        for child_name, child in children:
            convs = [(n, m) for n, m in child.named_modules() if isinstance(m, (nn.Conv2d, KSEConv2d))]
            if not convs:
                break
            firsts.append(convs[0][1].in_channels)
            lasts.append(convs[-1][1].out_channels)
            prefix = f"{name}.{child_name}" if name else child_name
            names.append(f"{prefix}.{convs[0][0]}" if convs[0][0] else prefix)
        else:
            growth = firsts[1] - firsts[0]
            if growth > 0 and all(b - a == growth for a, b in zip(firsts, firsts[1:])) \
                    and all(o == growth for o in lasts):
                blocks.append(DenseBlock(name, names, firsts[0], growth))
    return blocks


def _source_of_channels(block: DenseBlock, j: int) -> torch.Tensor:
    """``[C_in]`` index of the source of each input channel of layer j (0 = block input)."""
    layers = torch.arange(j).repeat_interleave(block.growth) + 1
    return torch.cat([torch.zeros(block.block_input, dtype=torch.long), layers])


def feature_reuse(model: nn.Module, cfg: Optional[KSEConfig] = None) -> List[BlockReuse]:
    """Mean KSE indicator and fraction of channels dropped, per dense block, layer and source.

    The indicators and counts are those ``kse.compress_`` would compute with ``cfg`` (only
    ``G``, ``T``, ``alpha``, ``k``, ``score`` and ``entropy_layout`` are used; the layer
    selection is the dense layers' first convolutions). Raises ``ValueError`` when the model
    has no dense block, or when a dense layer is already compressed.
    """
    cfg = cfg if cfg is not None else KSEConfig()
    if not isinstance(cfg, KSEConfig):
        raise TypeError(f"config must be a kse.KSEConfig, got {type(cfg).__name__}")
    blocks = find_dense_blocks(model)
    if not blocks:
        raise ValueError("the model has no dense block (a container whose children read inputs of widths c0, "
                         "c0 + g, c0 + 2g, ... and each write g channels), so there is no feature-reuse map; "
                         "it is made for DenseNets such as kse's densenet40 or torchvision's densenet121")
    names = [n for b in blocks for n in b.layers]
    compressed = [n for n in names if type(model.get_submodule(n)) is not nn.Conv2d]
    if compressed:
        raise ValueError(f"dense layer {compressed[0]!r} is already compressed: the feature-reuse map scores the "
                         "dense weights; give the checkpoint before compression")
    select = dataclasses.replace(cfg, include=names, exclude=[], skip_first=False, filter_fn=None)
    plans = {p.name: p for p in plan(model, select)}
    result = []
    for block in blocks:
        n = len(block.layers)
        mean = [[math.nan] * (n + 1) for _ in range(n)]
        drop = [[math.nan] * (n + 1) for _ in range(n)]
        for j, name in enumerate(block.layers):
            p = plans[name]
            source = _source_of_channels(block, j)
            v, dropped = p.indicator.double(), (p.counts == 0).double()
            for i in range(j + 1):
                sel = source == i
                mean[j][i] = float(v[sel].mean())
                drop[j][i] = float(dropped[sel].mean())
        result.append(BlockReuse(block.name, block.layers, block.block_input, block.growth, mean, drop))
    return result


def plot_feature_reuse(blocks: List[BlockReuse], path: Union[str, Path], title: str = "") -> Path:
    """PNG: per dense block, a heatmap of the mean indicator and one of the fraction dropped
    (rows: the reading layer j; columns: the source, block input then layer i)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_path

    path = Path(path)
    fig, axes = plt.subplots(2, len(blocks), figsize=(4.2 * len(blocks), 7.6), squeeze=False)
    for b, block in enumerate(blocks):
        for row, (key, label, cmap) in enumerate((("mean_indicator", "mean KSE indicator", "viridis"),
                                                  ("dropped_fraction", "fraction of channels dropped", "magma"))):
            ax = axes[row][b]
            data = torch.tensor(getattr(block, key))
            im = ax.imshow(data.numpy(), vmin=0, vmax=1, cmap=cmap, origin="upper")
            ax.set_xlabel("source: 0 = block input, i = layer i-1")
            ax.set_ylabel("reading layer j")
            ax.set_title(f"{block.block or 'block'}: {label}", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
