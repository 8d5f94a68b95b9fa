"""Pictures and the written report of :func:`kse.explain.explain`.

* ``feature_maps.png``: one layer's input feature maps for a few test images, ordered by the
  KSE indicator (Li et al., CVPR 2019, Eq. 7), each labelled with its indicator, centroid
  count (Eq. 8) and exact ablation importance;
* ``scatter.png``: indicator (top) and Taylor estimate (bottom) against ablation importance,
  one panel per stage;
* ``agreement.png``: Spearman's rho of every score with the ablation importance, with 95%
  bootstrap intervals;
* ``kernels_<stage>.png``: per layer, the 2D kernels that read the highest-, a middle- and
  the lowest-scoring input channel, and below each the centroids KSE replaces them with;
* ``report.md`` and ``explain.json``.

Example::

    >>> from kse.explain_plots import write_report
    >>> files = write_report(result, "runs/explain")   # result = kse.explain.explain(...)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .atomic import atomic_path, write_text
from .explain import AGREEMENT_SCORES, SCORE_TITLES, Explanation, LayerExplanation, spearman


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 80) -> Path:
    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path


def _stage(name: str) -> str:
    return name.split(".")[0] if "." in name else "model"


def _stages(layers: Sequence[LayerExplanation]) -> Dict[str, List[LayerExplanation]]:
    out: Dict[str, List[LayerExplanation]] = {}
    for layer in layers:
        out.setdefault(_stage(layer.name), []).append(layer)
    return out


def _count_label(q: int, n: int) -> str:
    if q == 0:
        return "dropped"
    if q == n:
        return "kept"
    return f"q={q}"


# ----------------------------------------------------------------------------- (a) feature maps
def plot_feature_maps(result: Explanation, path: Union[str, Path], max_channels: int = 24) -> Path:
    """Input maps of ``result.feature_maps["layer"]`` for a few images (the image itself in the
    first column), highest indicator first (at most ``max_channels``: the highest and the
    lowest halves), on one colour scale."""
    plt = _plt()
    fm = result.feature_maps
    layer = result.layer(fm["layer"])
    maps = fm["maps"].float()  # [I, C, H, W]
    inputs = fm.get("images")
    v = layer.scores["kse"]
    order: List[Optional[int]] = torch.argsort(v, descending=True, stable=True).tolist()
    if len(order) > max_channels:
        order = order[:max_channels // 2] + [None] + order[-(max_channels // 2):]
    lead = 1 if inputs is not None else 0
    n_img, n_col = maps.shape[0], len(order) + lead
    vmax = float(torch.quantile(maps.flatten(), 0.995)) if maps.numel() else 1.0
    vmin = min(0.0, float(maps.min()))
    fig, axes = plt.subplots(n_img, n_col, figsize=(0.95 * n_col + 0.3, 0.95 * n_img + 1.2), squeeze=False)
    for i in range(n_img):
        for j in range(n_col):
            axes[i][j].set_xticks([])
            axes[i][j].set_yticks([])
        if inputs is not None:
            img = inputs[i].float()
            axes[i][0].imshow(img.mean(0).numpy() if img.shape[0] != 3 else
                              ((img - img.min()) / (img.max() - img.min() + 1e-12)).permute(1, 2, 0).numpy(),
                              cmap="gray", interpolation="nearest")
            axes[i][0].set_ylabel(f"class {fm['labels'][i]}", fontsize=7)
            if i == 0:
                axes[i][0].set_title("input", fontsize=7)
    for j, c in enumerate(order, start=lead):
        for i in range(n_img):
            ax = axes[i][j]
            if c is None:
                ax.set_axis_off()
                if i == n_img // 2:
                    ax.text(0.5, 0.5, "...", ha="center", va="center", fontsize=12, transform=ax.transAxes)
                continue
            ax.imshow(maps[i, c].numpy(), cmap="magma", vmin=vmin, vmax=max(vmax, vmin + 1e-6), interpolation="nearest")
            if i == 0:
                q = int(layer.scores["counts"][c])
                ax.set_title(f"#{c}\nv={float(v[c]):.2f}\n{_count_label(q, layer.out_channels)}\n"
                             f"dL={float(layer.scores['loss_increase'][c]):+.3f}", fontsize=6.5,
                             color="tab:red" if q == 0 else "black")
    fig.suptitle(f"{layer.name}: input feature maps, highest KSE indicator v first (red: KSE G={result.settings['G']} "
                 f"drops it); dL: loss increase on {result.settings['images']} images when the map is zeroed",
                 fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.995, bottom=0.02, top=1 - 1.05 / (0.95 * n_img + 1.2),
                        wspace=0.06, hspace=0.06)
    return _save(fig, Path(path), dpi=72)


# ----------------------------------------------------------------------------- (b) scatter
def plot_scatter(result: Explanation, path: Union[str, Path]) -> Path:
    """Indicator and Taylor estimate against ablation importance, one column per stage."""
    plt = _plt()
    stages = _stages(result.layers)
    fig, axes = plt.subplots(2, len(stages), figsize=(4.2 * len(stages), 7.0), squeeze=False)
    colors = {"dropped": "tab:red", "clustered": "tab:orange", "kept": "tab:blue"}
    for j, (stage, layers) in enumerate(stages.items()):
        y = torch.cat([l.scores["loss_increase"] for l in layers]).numpy()
        for i, score in enumerate(("kse", "taylor")):
            ax = axes[i][j]
            x = torch.cat([l.scores[score] for l in layers]).numpy()
            q = torch.cat([l.scores["counts"] for l in layers]).numpy()
            n = np.concatenate([np.full(l.in_channels, l.out_channels) for l in layers])
            kind = np.where(q == 0, "dropped", np.where(q == n, "kept", "clustered"))
            for k, col in colors.items():
                sel = kind == k
                if sel.any():
                    ax.scatter(x[sel], y[sel], s=6, alpha=0.6, color=col, label=f"KSE: {k}", lw=0)
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.axhline(0, color="gray", lw=0.5)
            ax.set_xlabel(SCORE_TITLES[score] + (" (per layer, in [0, 1])" if score == "kse" else ""), fontsize=8)
            if j == 0:
                ax.set_ylabel("ablation: loss increase (symlog)", fontsize=8)
            per = [result.agreement[score]["per_layer"][l.name]["rho"] for l in layers]
            per = [r for r in per if r is not None]
            mean = f"{np.mean(per):+.2f}" if per else "n/a"
            ax.set_title(f"{stage}: {len(layers)} layers, {len(x)} channels\nrho pooled {spearman(x, y):+.2f}, "
                         f"mean within layer {mean}", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == 0 and j == 0:
                ax.legend(fontsize=7, markerscale=2)
    fig.suptitle("Does the score rank the channels the network uses?\n(each point: one input feature map of one layer)",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(path), dpi=80)


# ----------------------------------------------------------------------------- agreement bars
def plot_agreement(result: Explanation, path: Union[str, Path]) -> Path:
    """Spearman's rho with the ablation importance, per score: mean within layer and pooled."""
    plt = _plt()
    scores = [s for s in AGREEMENT_SCORES if s in result.agreement]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(scores) + 1.2))
    for k, (key, label, off, col) in enumerate((("mean_within_layer", "mean within layer", -0.18, "tab:blue"),
                                                 ("pooled", "pooled over layers", 0.18, "tab:gray"))):
        for i, s in enumerate(scores):
            a = result.agreement[s][key]
            if a["rho"] is None:
                continue
            lo, hi = a["ci95"]
            err = [[a["rho"] - lo], [hi - a["rho"]]] if lo is not None else None
            ax.barh(i + off, a["rho"], height=0.34, color=col, xerr=err, capsize=2, label=label if i == 0 else None)
    ax.set_yticks(range(len(scores)))
    ax.set_yticklabels([SCORE_TITLES[s] for s in scores], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlim(-1, 1)
    ax.set_xlabel("Spearman rho with the ablation importance (95% bootstrap interval)", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, Path(path), dpi=90)


# ----------------------------------------------------------------------------- (c) kernels
def _strip(kernels: torch.Tensor, order: Sequence[int], scale: float) -> np.ndarray:
    """``kernels: [N, kh, kw]`` side by side in ``order``, one NaN column between them."""
    kh, kw = kernels.shape[1:]
    out = np.full((kh, len(order) * (kw + 1) - 1), np.nan)
    for j, n in enumerate(order):
        out[:, j * (kw + 1): j * (kw + 1) + kw] = kernels[n].numpy() / scale
    return out


def plot_kernels(result: Explanation, path: Union[str, Path], layers: Optional[Sequence[str]] = None) -> Optional[Path]:
    """Per layer: the kernels ``W[:, c]`` of the highest-, a middle- and the lowest-indicator
    input channel, each above the centroids KSE gives them (kernels of one cluster side by side)."""
    plt = _plt()
    names = list(layers) if layers is not None else [l.name for l in result.layers]
    names = [n for n in names if n in result.clustered and n in result.weights]
    if not names:
        return None
    blocks, labels = [], []
    width = 0
    for name in names:
        layer = result.layer(name)
        w = result.weights[name].double()
        wc = result.clustered[name].double()
        N, C, kh, kw = w.shape
        scale = float(w.abs().max()) or 1.0
        v = layer.scores["kse"]
        q = layer.scores["counts"].long()
        order = torch.argsort(v, descending=True, stable=True).tolist()
        middle = [c for c in order if 0 < q[c] < N]
        picks = [("highest", order[0]), ("middle", middle[len(middle) // 2] if middle else order[len(order) // 2]),
                 ("lowest", order[-1])]
        for tag, c in picks:
            clustered = wc[:, c].reshape(N, -1)
            _, inverse = torch.unique(clustered, dim=0, return_inverse=True)
            kernel_order = sorted(range(N), key=lambda n: (int(inverse[n]), n))
            top = _strip(w[:, c], kernel_order, scale)
            bottom = _strip(wc[:, c], kernel_order, scale) if q[c] > 0 else np.full_like(top, np.nan)
            blocks.append(np.vstack([top, np.full((1, top.shape[1]), np.nan), bottom]))
            labels.append(f"{name} #{c} ({tag}) v={float(v[c]):.2f} {_count_label(int(q[c]), N)}")
            width = max(width, top.shape[1])
    gap = 2
    per_layer = 3  # blocks per layer (highest, middle, lowest)
    total = sum(b.shape[0] + gap for b in blocks)
    # layers in columns, so that the picture is about as tall as wide
    ncols = int(min(4, max(1, round(math.sqrt(total / (width * 1.5))))))
    n_layers = len(blocks) // per_layer
    per_col = math.ceil(n_layers / ncols)
    columns = [list(range(c * per_col * per_layer, min(len(blocks), (c + 1) * per_col * per_layer)))
               for c in range(ncols)]
    rows = max(sum(blocks[i].shape[0] + gap for i in col) for col in columns)
    img_w = min(7.0, max(2.5, 0.05 * width))  # inches of kernels per column; labels take 2.6 more
    img_h = img_w * rows / width
    col_w = img_w + 2.6
    fig = plt.figure(figsize=(col_w * ncols, img_h + 0.6))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")
    for c, col in enumerate(columns):
        canvas = np.full((rows, width), np.nan)
        y, ys = 0, []
        for i in col:
            canvas[y:y + blocks[i].shape[0], :blocks[i].shape[1]] = blocks[i]
            ys.append(y)
            y += blocks[i].shape[0] + gap
        ax = fig.add_axes(((c * col_w + 2.5) / (col_w * ncols), 0.1 / (img_h + 0.6), img_w / (col_w * ncols),
                           img_h / (img_h + 0.6)))
        ax.imshow(canvas, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest", aspect="auto")
        for y0, i in zip(ys, col):
            ax.text(-2, y0 + blocks[i].shape[0] / 2, labels[i], ha="right", va="center", fontsize=6)
        ax.set_axis_off()
    fig.suptitle("kernels W[:, c] (upper row) and their KSE centroids (lower row; empty: channel dropped);\n"
                 "kernels of one cluster side by side, colour scaled per layer (blue < 0 < red)", fontsize=7,
                 y=1 - 0.02 / (img_h + 0.6))
    return _save(fig, Path(path), dpi=85)


# ----------------------------------------------------------------------------- report
def _rho(a: Dict[str, Any]) -> str:
    if a["rho"] is None:
        return "n/a"
    lo, hi = a["ci95"]
    return f"{a['rho']:+.2f} [{lo:+.2f}, {hi:+.2f}]" if lo is not None else f"{a['rho']:+.2f}"


def summary(result: Explanation) -> List[str]:
    """Two or three sentences that state the findings, numbers included."""
    ag, s = result.agreement, result.settings
    kse, tay = ag["kse"]["mean_within_layer"], ag["taylor"]["mean_within_layer"]
    rnd = ag["random"]["mean_within_layer"]
    first = (f"On {s['images']} test images, the data-free KSE indicator ranks the input feature maps of a layer "
             f"with a mean Spearman rho of {_rho(kse)} against their exact ablation importance (the loss increase "
             f"when the map is zeroed; pooled over all {ag['kse']['pooled']['channels']} channels: "
             f"{_rho(ag['kse']['pooled'])}); the data-driven Taylor estimate reaches {_rho(tay)}, a random score "
             f"{_rho(rnd)}")
    if result.split_half is not None:
        first += (f", and the ablation ranking itself agrees with the same ranking on the other half of the images "
                  f"at {_rho(result.split_half['mean_within_layer'])}")
    lines = [first + "."]
    if result.drop:
        rows, base = result.drop["rows"], result.drop["baseline_top1"]

        def get(k: str, key: str) -> str:
            r = rows.get(k)
            return f"{r[key]:.2f}%" if r is not None and key in r else "n/a"

        line = (f"Dropping per layer as many input channels as KSE G={s['G']} drops, top-1 is {get('kse', 'top1_dropped_only')} "
                f"when KSE chooses them, {get('ablation', 'top1_dropped_only')} when the ablation ranking does and "
                f"{get('random', 'top1_dropped_only')} at random (intact model {base:.2f}%)")
        if any("top1_recalibrated" in r for r in rows.values()):
            line += (f"; with the other channels clustered as KSE does and the BatchNorm statistics re-estimated, "
                     f"{get('kse', 'top1_recalibrated')}, {get('ablation', 'top1_recalibrated')} and "
                     f"{get('random', 'top1_recalibrated')}")
        lines.append(line + ", before any fine-tuning.")
    return lines


def write_report(result: Explanation, out: Union[str, Path], command: Optional[str] = None,
                 extra: Optional[Dict[str, Any]] = None) -> List[Path]:
    """``report.md``, ``explain.json`` and the pictures in folder ``out``; returns the files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [plot_feature_maps(result, out / "feature_maps.png"), plot_scatter(result, out / "scatter.png"),
             plot_agreement(result, out / "agreement.png")]
    stage_files = []
    for stage, layers in _stages(result.layers).items():
        p = plot_kernels(result, out / f"kernels_{stage}.png", [l.name for l in layers])
        if p is not None:
            stage_files.append(p)
    files += stage_files
    data = result.to_dict()
    if extra:
        data["run"] = extra
    with atomic_path(out / "explain.json") as tmp:
        tmp.write_text(json.dumps(data) + "\n")
    files.append(out / "explain.json")
    write_text(out / "report.md", _markdown(result, command, extra, [f.name for f in stage_files]))
    files.append(out / "report.md")
    return files


def _markdown(result: Explanation, command: Optional[str], extra: Optional[Dict[str, Any]],
              kernel_pngs: Sequence[str]) -> str:
    s, ag = result.settings, result.agreement
    lines = ["# What the KSE indicator says about the feature maps, tested on data", ""]
    lines += summary(result) + [""]
    if command:
        lines += ["Made with", "", "```bash", command, "```", ""]
    run = extra or {}
    facts = [f"{len(result.layers)} layers, {sum(l.in_channels for l in result.layers)} input channels, "
             f"{s['images']} images (intact model on them: loss {s['base_loss']:.4f}, top-1 {s['base_top1']:.2f}%)",
             f"KSE G={s['G']}, T={s['T']}, alpha={s['alpha']}, k={s['k']}; bootstrap: {s['bootstrap_resamples']} "
             f"resamples of the channels, seed {s['seed']}"]
    for k, v in run.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a} {b}" for a, b in v.items())
        facts.append(f"{k.replace('_', ' ')}: {v}")
    facts.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items()))
    lines += [f"- {f}" for f in facts] + [""]

    lines += ["## Agreement with the exact ablation importance", "",
              "Spearman's rho between each score and the loss increase when the feature map is zeroed "
              "(95% bootstrap interval). *Mean within layer*: the average of the per-layer rho (what matters "
              "for KSE, which ranks channels inside each layer); *pooled*: all channels of all layers as one sample.",
              "The last column ranks against the *size* of the loss change either way (|loss increase|): "
              "zeroing some maps lowers the loss on these images, and a magnitude score (Taylor, activation) "
              "cannot tell the two directions apart.",
              "", "| score | mean within layer | pooled | layers | mean within layer, vs abs(loss change) |",
              "|---|---|---|---|---|"]
    mag = result.agreement_magnitude or {}
    for score in AGREEMENT_SCORES:
        if score in ag:
            a = ag[score]
            m = _rho(mag[score]["mean_within_layer"]) if score in mag else "-"
            lines.append(f"| {SCORE_TITLES[score]} | {_rho(a['mean_within_layer'])} | {_rho(a['pooled'])} | "
                         f"{a['mean_within_layer']['layers']} | {m} |")
    if result.split_half is not None:
        sh = result.split_half
        lines.append(f"| *ablation on the even-indexed images vs the odd-indexed ones* | {_rho(sh['mean_within_layer'])} | "
                     f"{_rho(sh['pooled'])} | {sh['mean_within_layer']['layers']} | - |")
    lines += ["", "The last row is the split-half reliability of the target: the ablation ranking from the "
                  "even-indexed images against the one from the odd-indexed images. Near zero, the single-channel "
                  "ablation ranks a layer's channels mostly by which images happen to be in the sample; read the "
                  "other rows against it (more images, --images, give a steadier target). The intervals resample "
                  "channels, not images.",
              "", "![agreement](agreement.png)", ""]

    if result.drop:
        d = result.drop
        lines += ["## Does it pick the right channels?", "",
                  f"For each score, every layer drops as many input channels as KSE G={s['G']} drops, the "
                  f"weakest by that score. *Dropped only*: nothing else changes. *Dropped + clustered*: the other "
                  f"channels get KSE's centroid counts in the score's order and their kernels are clustered as KSE "
                  f"does (the KSE row is what `kse compress` builds). Top-1 on "
                  f"{run.get('eval_images', 'the evaluation')} held-out test images, before any fine-tuning; the "
                  f"last column after re-estimating the BatchNorm statistics on {d['recal_batches']} batches of "
                  f"unlabeled training images. Intact model: {d['baseline_top1']:.2f}%.", "",
                  "| channels chosen by | dropped | layers with KSE's choice | top-1, dropped only | "
                  "top-1, dropped + clustered | same, BatchNorm recalibrated |", "|---|---|---|---|---|---|"]
        for score, r in d["rows"].items():
            rec = f"{r['top1_recalibrated']:.2f}%" if "top1_recalibrated" in r else "-"
            lines.append(f"| {SCORE_TITLES[score]} | {r['dropped']} | {r['same_as_kse']}/{len(result.layers)} | "
                         f"{r['top1_dropped_only']:.2f}% | {r['top1']:.2f}% | {rec} |")
        if "producer_l1" in d["rows"]:
            n_none = sum(1 for l in result.layers if l.producer is None)
            lines += ["", f"Producing-filter L1 is defined where one convolution produces the map; the {n_none} "
                          "layers whose input is a sum (the first convolution of a residual block) keep KSE's "
                          "choice in that row."]
        lines.append("")

    lines += ["## Pictures", "", "![feature maps](feature_maps.png)", "", "![scatter](scatter.png)", ""]
    lines += [f"![kernels]({name})" for name in kernel_pngs] + [""]

    lines += ["## Per layer", "", "| layer | C_in | dropped by KSE | rho KSE | rho sparsity | rho entropy | "
              "rho producer L1 | rho Taylor | largest loss increase |", "|---|---|---|---|---|---|---|---|---|"]
    for l in result.layers:
        def r(score: str) -> str:
            v = ag[score]["per_layer"][l.name]["rho"]
            return "n/a" if v is None else f"{v:+.2f}"
        lines.append(f"| {l.name} | {l.in_channels} | {int((l.scores['counts'] == 0).sum())} | {r('kse')} | "
                     f"{r('sparsity')} | {r('entropy')} | {r('producer_l1')} | {r('taylor')} | "
                     f"{float(l.scores['loss_increase'].max()):+.4f} |")
    lines += ["", "## Definitions", "",
              "- ablation importance: mean cross-entropy on the images with input feature map c of the layer set "
              "to zero (as that layer reads it; a residual shortcut keeps it, as KSE's pruning does), minus the "
              "intact model's; exact, the rest of the network run once per channel;",
              "- Taylor: mean over images of |sum over the map of activation x gradient of the image's loss|;",
              "- activation: mean |activation| of the map; producing-filter L1: sum |W| of the filter of the "
              "convolution that produces the map (L1 filter pruning's score); sparsity s and entropy e: KSE "
              "Eqs. 4-6; KSE indicator v: Eq. 7 (a higher entropy lowers it, so *entropy alone* ranks by -e); "
              "random: uniform numbers (seeded).", ""]
    return "\n".join(lines)
