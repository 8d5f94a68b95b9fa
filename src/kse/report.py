"""Reporting helpers for the ``kse`` command: text and Markdown tables, number formatting,
per-layer summaries of a KSE plan (docs/method.md §3-4), plots, and CPU latency measurement.

Latency is the median wall time of ``repeats`` forward passes after ``warmup`` passes, under
``torch.no_grad``, on one random batch (the median, not the minimum: it is what a caller sees
on a busy machine, and it is robust to the odd slow run).

Example::

    >>> import kse
    >>> from kse.models import get_model
    >>> from kse.report import layer_summary, text_table
    >>> net = get_model("resnet20").eval()
    >>> rows = layer_summary(kse.plan(net, kse.KSEConfig(G=4)))
    >>> print(text_table(["layer", "kept"], [[r["name"], r["kept"]] for r in rows[:2]]))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .conv import KSEConv2d
from .module_utils import capture_layer_inputs, eval_mode, set_module  # noqa: F401 (re-exported)
from .timing import time_call


# ----------------------------------------------------------------------------- formatting
def fmt_count(n: float) -> str:
    """``851504 -> '851.5K'``, ``125485706 -> '125.49M'``."""
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def fmt_bytes(n: float) -> str:
    """``3_400_000 -> '3.24 MiB'``."""
    n = float(n)
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_ratio(before: float, after: float) -> str:
    """``before / after`` as ``'2.09x'`` (``'-'`` when ``after`` is 0)."""
    return f"{before / after:.2f}x" if after else "-"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Fixed-width table: the first column left-aligned (names), the others right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([line(list(headers)), line(["-" * w for w in widths])] + [line(r) for r in cells])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def accuracy_rows(baseline_top1: float, steps: Sequence[Tuple[str, Optional[float]]]) -> List[List[str]]:
    """Table rows of the compressed model's top-1 after each step of a pipeline, next to the
    baseline's, with the change in points: ``steps`` is ``[(label, top-1 or None when the step
    was skipped), ...]``; skipped steps get no row.

        >>> accuracy_rows(94.33, [("right after compression", 12.49), ("BatchNorm recalibrated", None)])
        [['top-1 (%), right after compression', '94.33', '12.49', '-81.84 pt']]
    """
    return [[f"top-1 (%), {label}", f"{baseline_top1:.2f}", f"{top1:.2f}", f"{top1 - baseline_top1:+.2f} pt"]
            for label, top1 in steps if top1 is not None]


# ----------------------------------------------------------------------------- layer summaries
def layer_summary(plans) -> List[Dict[str, Any]]:
    """One dict per :class:`kse.LayerPlan`: channels, kept, centroids, ratio, indicator stats.

    ``ratio`` is the layer's kernel compression, dense kernels / centroids =
    ``N * C_in / sum_c q_c`` (the kernel size cancels).
    """
    rows = []
    for p in plans:
        v = p.indicator.detach().float().cpu()
        rows.append({
            "name": p.name, "in_channels": p.in_channels, "out_channels": p.out_channels,
            "kept": p.kept, "centroids": p.centroids,
            "ratio": p.out_channels * p.in_channels / max(p.centroids, 1),
            "indicator_min": float(v.min()), "indicator_mean": float(v.mean()), "indicator_max": float(v.max()),
            "counts": p.counts.tolist(), "indicator": [round(float(x), 6) for x in v],
        })
    return rows


def kse_layer_summary(model: nn.Module) -> List[Dict[str, Any]]:
    """The same rows for the KSE layers a model already has (no indicator: it is not stored)."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, KSEConv2d):
            centroids = int(m.centroid_counts.sum())
            rows.append({
                "name": name, "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kept": len(m.kept_channels), "centroids": centroids,
                "ratio": m.out_channels * m.in_channels / max(centroids, 1),
                "indicator_min": None, "indicator_mean": None, "indicator_max": None,
                "counts": m.centroid_counts.tolist(), "indicator": None, "form": m.form,
            })
    return rows


def summary_totals(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Totals over the rows: input channels kept, kernels and centroids, overall ratio."""
    kernels = sum(r["out_channels"] * r["in_channels"] for r in rows)
    centroids = sum(r["centroids"] for r in rows)
    return {"layers": len(rows), "in_channels": sum(r["in_channels"] for r in rows),
            "kept": sum(r["kept"] for r in rows), "kernels": kernels, "centroids": centroids,
            "ratio": kernels / max(centroids, 1)}


def plot_layers(rows: Sequence[Dict[str, Any]], path: Path, G: Optional[int] = None, title: str = "") -> Path:
    """PNG with two panels: per-layer fraction of input channels kept and of kernels kept as
    centroids, and the histogram of the KSE indicator over every scored input channel (with
    the group boundaries k/G when ``G`` is given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = [v for r in rows for v in (r.get("indicator") or [])]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    x = list(range(len(rows)))
    kept = [r["kept"] / r["in_channels"] for r in rows]
    cent = [r["centroids"] / (r["in_channels"] * r["out_channels"]) for r in rows]
    ax = axes[0]
    ax.bar([i - 0.2 for i in x], kept, width=0.4, label="input channels kept")
    ax.bar([i + 0.2 for i in x], cent, width=0.4, label="centroids / kernels")
    ax.set_xticks(x)
    ax.set_xticklabels([r["name"] for r in rows], rotation=90, fontsize=max(4, 9 - len(rows) // 12))
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("fraction")
    ax.set_title("per layer")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax = axes[1]
    if values:
        ax.hist(values, bins=20, range=(0, 1), color="tab:gray")
        if G:
            for k in range(1, G):
                ax.axvline(k / G, color="tab:red", lw=0.8, ls="--")
        ax.set_xlabel("KSE indicator v (per input channel)")
        ax.set_ylabel("input channels")
    else:
        ax.text(0.5, 0.5, "indicator not stored\n(already compressed)", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("indicator histogram" + (f" (G={G})" if G else ""))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- latency
@torch.no_grad()
def measure_latency(model: nn.Module, input_size: Sequence[int], batch_size: int = 1, warmup: int = 3,
                    repeats: int = 20, seed: int = 0) -> Dict[str, float]:
    """Latency of ``model`` (eval mode) on a random ``Tensor[batch_size, *input_size]`` on its device.

    Returns ``median_ms`` (per batch), ``per_image_ms``, ``min_ms``, ``batch_size``, ``repeats``.
    """
    p = next(model.parameters())
    x = torch.randn(batch_size, *input_size, generator=torch.Generator().manual_seed(seed)).to(p.device, p.dtype)
    with eval_mode(model), torch.no_grad():
        t = time_call(model, x, warmup, repeats)
    return {**t, "batch_size": batch_size, "per_image_ms": t["median_ms"] / batch_size}


def busy_note() -> Optional[str]:
    """A warning when other processes keep the CPUs busy (latencies are then unreliable), else None."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return None
    cores = os.cpu_count() or 1
    if load < 0.75 * cores:
        return None
    return (f"the machine is busy (load {load:.1f} on {cores} cores): latencies will be noisy and slower; "
            f"--threads 1 avoids the worst of it")


def dense_equivalent(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`KSEConv2d` replaced by ``layer.to_conv()``: the
    same function computed by plain dense convolutions (the uncompressed-speed baseline)."""
    dense = copy.deepcopy(model)
    swaps = [(n, m.to_conv()) for n, m in dense.named_modules() if isinstance(m, KSEConv2d)]
    for name, conv in swaps:
        set_module(dense, name, conv)
    return dense
