"""Explain and test the KSE indicator on data: which input feature maps KSE keeps, and whether
they are the ones the network uses.

KSE (Li et al., "Exploiting Kernel Sparsity and Entropy for Interpretable CNN Compression",
CVPR 2019) scores input feature map c of a convolution from the N 2D kernels ``W[:, c]`` that
read it: kernel sparsity (Eq. 4), kernel entropy (Eqs. 5-6), the indicator (Eq. 7) and the
centroid count (Eq. 8). :func:`explain` puts these next to what the network does with real
images (:mod:`kse.ablation`) and reports

1. per layer and input channel: sparsity ``s``, entropy ``e``, indicator ``v``, centroid count
   ``q``, the L1 norm of the producing filter (where one convolution produces the map, through
   per-channel operations only), exact ablation importance (loss increase, top-1 drop), the
   first-order Taylor estimate, the mean absolute activation, and a random score;
2. agreement: Spearman's rank correlation of each score with the ablation loss increase, per
   layer, pooled over all channels of all layers, and the mean of the per-layer values, each
   with a bootstrap 95% interval (channels resampled, fixed seed, the same resamples for all
   scores);
3. "does it pick the right channels?": for each score, per layer, the centroid counts KSE
   gives (at G, T) are handed out by that score's ranking instead (the weakest channels get
   the zeros, that is, are dropped), the layers are clustered as KSE does
   (:func:`kse.compress.build_layers`), and top-1 is measured before fine-tuning and after
   re-estimating the BatchNorm statistics on unlabeled training images.

Example::

    >>> import torch, kse
    >>> from kse.explain import explain
    >>> net = kse.models.get_model("resnet20", num_classes=10).eval()
    >>> x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    >>> result = explain(net, x, y, layers=["layer3.*"])
    >>> sorted(result.agreement["kse"])
    ['mean_within_layer', 'per_layer', 'pooled']
"""

from __future__ import annotations

import copy
import fnmatch
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .ablation import DEFAULT_ROWS, Progress, _map_threads, _say, _Tracer, ablation_importance, taylor_importance
from .compress import LayerPlan, build_layers, plan, select_layers
from .config import KSEConfig
from .indicator import kernel_entropy, kernel_sparsity
from .module_utils import capture_layer_inputs, set_module
from .recalibrate import recalibrate_bn_

# scores compared with the ablation importance (item 2), and those whose choice of channels is
# evaluated (item 3); "ablation" there is the data-driven oracle
AGREEMENT_SCORES = ("kse", "sparsity", "entropy", "producer_l1", "taylor", "activation", "random")
DROP_SCORES = ("kse", "sparsity", "entropy", "producer_l1", "random", "ablation")
SCORE_TITLES = {
    "kse": "KSE indicator v", "sparsity": "sparsity s alone", "entropy": "entropy alone (-e)",
    "producer_l1": "producing-filter L1", "taylor": "Taylor estimate", "activation": "mean abs activation",
    "random": "random", "ablation": "ablation (oracle)",
}


@dataclass
class LayerExplanation:
    """Every score of the input channels of one layer (tensors of length ``in_channels``)."""

    name: str
    in_channels: int
    out_channels: int
    scores: Dict[str, Tensor]  # see SCORE_TITLES, plus "counts", "top1_drop", "loss_increase"
    producer: Optional[str] = None  # the conv whose filters produce the input maps, if one does

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"name": self.name, "in_channels": self.in_channels,
                               "out_channels": self.out_channels, "producer": self.producer}
        for key, value in self.scores.items():
            out[key] = [None if not math.isfinite(v) else float(f"{v:.6g}") for v in value.double().tolist()]
        return out


@dataclass
class Explanation:
    """What :func:`explain` found; ``to_dict()`` is its JSON form."""

    layers: List[LayerExplanation]
    agreement: Dict[str, Dict[str, Any]]
    drop: Optional[Dict[str, Any]]
    settings: Dict[str, Any]
    timings: Dict[str, float] = field(default_factory=dict)
    agreement_magnitude: Optional[Dict[str, Dict[str, Any]]] = None  # against |loss increase|
    # Spearman of the loss increase on the even-indexed images with that on the odd-indexed ones
    split_half: Optional[Dict[str, Any]] = None
    # for the pictures (not in the JSON): a few images' input maps of one layer, and the
    # clustered weights KSE gives each layer
    feature_maps: Optional[Dict[str, Any]] = None
    clustered: Dict[str, Tensor] = field(default_factory=dict)
    weights: Dict[str, Tensor] = field(default_factory=dict)

    def layer(self, name: str) -> LayerExplanation:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ValueError(f"no layer {name!r} in the explanation; layers: {', '.join(l.name for l in self.layers)}")

    def to_dict(self) -> Dict[str, Any]:
        return {"settings": self.settings, "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
                "agreement": self.agreement, "agreement_magnitude": self.agreement_magnitude,
                "split_half": self.split_half, "drop": self.drop,
                "layers": [l.to_dict() for l in self.layers]}


# ----------------------------------------------------------------------------- data-free scores
def producer_convs(model: nn.Module, names: Sequence[str]) -> Dict[str, Optional[str]]:
    """For each conv in ``names``: the ``nn.Conv2d`` whose output channels are its input maps
    through per-channel operations only (BatchNorm, ReLU, dropout), else None (a sum of two
    branches, a concatenation, the network input, or a model ``torch.fx`` cannot trace)."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: unknown
        return {n: None for n in names}
    modules = dict(model.named_modules())
    passthrough = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout, nn.Dropout2d)
    result: Dict[str, Optional[str]] = {}
    for name in names:
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
        found = None
        if len(calls) == 1 and calls[0].args and isinstance(calls[0].args[0], fx.Node):
            node = calls[0].args[0]
            while True:
                if node.op == "call_module" and type(modules.get(node.target)) in passthrough:
                    node = node.args[0]
                elif node.op == "call_function" and node.target in (F.relu, torch.relu) and node.args:
                    node = node.args[0]
                elif node.op == "call_method" and node.target in ("relu", "relu_") and node.args:
                    node = node.args[0]
                else:
                    break
                if not isinstance(node, fx.Node):
                    break
            if (isinstance(node, fx.Node) and node.op == "call_module" and type(modules.get(node.target)) is nn.Conv2d
                    and modules[node.target].out_channels == modules[name].in_channels):
                found = node.target
        result[name] = found
    return result


def data_free_scores(model: nn.Module, names: Sequence[str], config: KSEConfig,
                     example: Optional[Tensor] = None) -> Dict[str, Dict[str, Any]]:
    """Sparsity, entropy, KSE indicator and centroid count (what ``compress_`` uses, from
    :func:`kse.compress.plan`), and the producing filter's L1 norm, of every layer in ``names``."""
    cfg = copy.copy(config)
    cfg.include, cfg.exclude, cfg.filter_fn = list(names), [], None
    plans = {p.name: p for p in plan(model, cfg, example)}
    missing = [n for n in names if n not in plans]
    if missing:
        raise ValueError(f"layers {missing} are not ones KSE compresses (the first conv, grouped convs and "
                         "compressed layers are skipped); leave them out of the layer patterns")
    producers = producer_convs(model, names)
    out = {}
    for name in names:
        w = model.get_submodule(name).weight.detach()
        producer = producers[name]
        l1 = (model.get_submodule(producer).weight.detach().double().abs().sum((1, 2, 3)) if producer
              else torch.full((w.shape[1],), float("nan"), dtype=torch.float64))
        out[name] = {"plan": plans[name], "producer": producer, "scores": {
            "sparsity": kernel_sparsity(w).double().cpu(), "entropy": kernel_entropy(w, config.k).double().cpu(),
            "kse": plans[name].indicator.double().cpu(), "counts": plans[name].counts.double().cpu(),
            "producer_l1": l1.cpu()}}
    return out


def _ranking_score(layer: LayerExplanation, score: str) -> Tensor:
    """The values whose order is the score's ranking (larger: more important)."""
    if score == "entropy":
        return -layer.scores["entropy"]  # Eq. 7: a higher entropy lowers the indicator
    if score == "ablation":
        return layer.scores["loss_increase"]
    return layer.scores[score]


# ----------------------------------------------------------------------------- agreement
def rank_rows(a: np.ndarray) -> np.ndarray:
    """Ranks (1-based, ties get their average rank) along the last axis of ``a``."""
    a = np.asarray(a, dtype=np.float64)
    n = a.shape[-1]
    flat = a.reshape(-1, n)
    order = np.argsort(flat, axis=1, kind="stable")
    s = np.take_along_axis(flat, order, 1)
    new = np.ones_like(s, dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    pos = np.broadcast_to(np.arange(n), s.shape)
    first = np.maximum.accumulate(np.where(new, pos, 0), axis=1)
    end = np.ones_like(new)
    end[:, :-1] = new[:, 1:]
    last = np.minimum.accumulate(np.where(end, pos, n - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty_like(s)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, 1)
    return ranks.reshape(a.shape)


def _pearson_rows(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(-1) / np.where(den > 0, den, 1), np.nan)


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair of ``x, y: [R, n]`` (NaN where a row is constant)."""
    return _pearson_rows(rank_rows(x), rank_rows(y))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of two sequences (average ranks for ties; NaN if one is constant)."""
    return float(spearman_rows(np.asarray(x, dtype=np.float64)[None], np.asarray(y, dtype=np.float64)[None])[0])


def resampled_ranks(x: np.ndarray, draw: np.ndarray) -> np.ndarray:
    """``rank_rows(x[draw])`` without sorting each resample: ``draw: [R, n]`` picks indices of
    ``x: [n]``; a value's average rank in a resample is the number of drawn values below it
    plus half of (the number drawn equal to it, plus one)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.ones(len(x), dtype=bool)
    new[1:] = xs[1:] != xs[:-1]
    groups = int(new.sum())
    gid = np.empty(len(x), dtype=np.int64)
    gid[order] = np.cumsum(new) - 1
    R = draw.shape[0]
    g = gid[draw]  # [R, n]
    count = np.bincount((np.arange(R)[:, None] * groups + g).ravel(), minlength=R * groups).reshape(R, groups)
    below = np.cumsum(count, 1) - count
    return np.take_along_axis(below + (count + 1) / 2, g, 1)


def _interval(samples: np.ndarray) -> List[Optional[float]]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [None, None]
    return [round(float(np.percentile(samples, 2.5)), 4), round(float(np.percentile(samples, 97.5)), 4)]


def _num(v: float) -> Optional[float]:
    return round(float(v), 4) if math.isfinite(v) else None


def agreement(layers: Sequence[LayerExplanation], scores: Iterable[str] = AGREEMENT_SCORES,
              target: str = "loss_increase", resamples: int = 1000, seed: int = 0,
              magnitude: bool = False) -> Dict[str, Dict[str, Any]]:
    """Spearman's rho of each score with ``target`` (its absolute value with ``magnitude``,
    how much the loss moves either way): per layer, pooled over every channel of
    every layer, and the mean of the per-layer values; each with a 95% percentile bootstrap
    interval from ``resamples`` resamplings of the channels (within each layer for the per-layer
    and mean values). The same resamples serve every score (the intervals are paired).
    Channels where a score is undefined (producer L1 of a layer without a single producer) are
    left out of that score's statistics."""
    if not isinstance(resamples, int) or isinstance(resamples, bool) or resamples < 1:
        raise ValueError(f"resamples must be an integer >= 1, got {resamples!r}")
    scores = list(scores)
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, l.in_channels, size=(resamples, l.in_channels)) for l in layers]
    targets = [(l.scores[target].abs() if magnitude else l.scores[target]).double().numpy() for l in layers]
    target_ranks = [resampled_ranks(y, d) for y, d in zip(targets, draws)]
    y_all = np.concatenate(targets)
    pooled_draw = rng.integers(0, len(y_all), size=(resamples, len(y_all)))
    pooled_target_ranks = resampled_ranks(y_all, pooled_draw)
    out: Dict[str, Dict[str, Any]] = {}
    for score in scores:
        per_layer, boot_rows, xs = {}, [], []
        for layer, draw, y, ry in zip(layers, draws, targets, target_ranks):
            x = _ranking_score(layer, score).double().numpy()
            xs.append(x)
            if not np.isfinite(x).all():
                per_layer[layer.name] = {"rho": None, "ci95": [None, None]}
                boot_rows.append(np.full(resamples, np.nan))
                continue
            boot = _pearson_rows(resampled_ranks(x, draw), ry)
            per_layer[layer.name] = {"rho": _num(spearman(x, y)), "ci95": _interval(boot)}
            boot_rows.append(boot)
        x_all = np.concatenate(xs)
        keep = np.isfinite(x_all)
        if keep.all():
            pooled = spearman(x_all, y_all)
            pooled_boot = _pearson_rows(resampled_ranks(x_all, pooled_draw), pooled_target_ranks)
        elif keep.sum() > 1:  # resample among the channels where the score is defined
            xd, yd = x_all[keep], y_all[keep]
            d = np.random.default_rng([seed, 1]).integers(0, len(xd), size=(resamples, len(xd)))
            pooled = spearman(xd, yd)
            pooled_boot = _pearson_rows(resampled_ranks(xd, d), resampled_ranks(yd, d))
        else:
            pooled, pooled_boot = float("nan"), np.full(resamples, np.nan)
        rhos = np.array([v["rho"] if v["rho"] is not None else np.nan for v in per_layer.values()])
        defined = np.isfinite(rhos)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resamples of a layer
            boot_mean = np.nanmean(np.stack(boot_rows, 1)[:, defined], axis=1) if defined.any() \
                else np.full(resamples, np.nan)
        out[score] = {
            "pooled": {"rho": _num(pooled), "ci95": _interval(pooled_boot), "channels": int(keep.sum())},
            "mean_within_layer": {"rho": _num(float(np.mean(rhos[defined]))) if defined.any() else None,
                                  "ci95": _interval(boot_mean), "layers": int(defined.sum())},
            "per_layer": per_layer,
        }
    return out


# ----------------------------------------------------------------------------- dropping channels
def counts_by_score(kse_counts: Tensor, score: Tensor) -> Tensor:
    """KSE's centroid counts of a layer, handed out in the order of another score: the channel
    with the k-th smallest score gets the k-th smallest count (ties keep channel order). With
    KSE's own indicator this gives KSE's counts back."""
    if kse_counts.shape != score.shape:
        raise ValueError(f"counts and score must have the same shape, got {tuple(kse_counts.shape)} and "
                         f"{tuple(score.shape)}")
    order = torch.sort(score.double().cpu(), stable=True).indices
    out = torch.empty_like(kse_counts)
    out[order] = torch.sort(kse_counts, stable=True).values
    return out


def _top1(model: nn.Module, loader, device: torch.device) -> float:
    """Top-1 (percent) of ``model`` on ``loader`` (eval mode, channels-last on CPU).

    NOTE: the BatchNorms are not folded here (that would be faster): folding traces the model
    with ``torch.fx``, which patches ``nn.Module.__call__`` for the whole process and so must
    not run while other threads run models (``drop_experiment`` evaluates scores in parallel)."""
    fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    fast = copy.deepcopy(model).eval().to(device=device, memory_format=fmt)
    correct = seen = 0
    with torch.inference_mode():
        for x, y in loader:
            x = x.to(device)
            out = fast(x.contiguous(memory_format=fmt) if x.ndim == 4 else x)
            correct += int((out.argmax(1) == y.to(device)).sum())
            seen += len(y)
    return 100.0 * correct / max(seen, 1)


def _dropped_only(model: nn.Module, counts: Dict[str, Tensor]) -> nn.Module:
    """A copy of ``model`` with the input channels of count 0 zeroed and nothing else changed."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, c in counts.items():
            out.get_submodule(name).weight[:, (c == 0).to(out.get_submodule(name).weight.device)] = 0
    return out


def _with_counts(model: nn.Module, plans: List[LayerPlan], counts: Dict[str, Tensor], cfg: KSEConfig) -> nn.Module:
    """A copy of ``model`` whose planned layers are clustered with ``counts`` (as plain convs
    holding the clustered weights: the same function, evaluated fast)."""
    new_plans = [LayerPlan(p.name, p.in_channels, p.out_channels, p.indicator, counts[p.name]) for p in plans]
    layers = build_layers(model, new_plans, cfg)
    out = copy.deepcopy(model)
    for name, layer in layers.items():
        set_module(out, name, layer.to_conv())
    return out


def drop_experiment(model: nn.Module, layers: Sequence[LayerExplanation], plans: List[LayerPlan], cfg: KSEConfig,
                    eval_loader, recal_loader=None, recal_batches: int = 8, scores: Iterable[str] = DROP_SCORES,
                    device: Optional[torch.device] = None, progress: Progress = None,
                    clustered_out: Optional[Dict[str, Tensor]] = None, workers: Optional[int] = None) -> Dict[str, Any]:
    """Item 3: top-1 of the model with each score choosing the channels KSE's counts go to.

    ``workers`` scores are worked on at the same time, each on one intra-op thread (default:
    on CPU, ``torch.get_num_threads()``). Returns ``{"baseline_top1", "recal_batches", "rows":
    {score: {"top1_dropped_only", "top1", "top1_recalibrated", "dropped", "centroids",
    "same_as_kse"}}}``: top-1 with the channels dropped and nothing else changed, dropped and
    the rest clustered, and that after BatchNorm recalibration.
    ``clustered_out``, if given, receives the clustered weights of the KSE row (for the pictures)."""
    device = device if device is not None else next(model.parameters()).device
    if workers is None:
        workers = torch.get_num_threads() if device.type == "cpu" else 1
    by_name = {l.name: l for l in layers}
    kse_counts = {p.name: p.counts.cpu() for p in plans}
    scores = list(scores)

    def one(score: Optional[str]):
        if score is None:
            return None, {"top1": _top1(model, eval_loader, device)}
        if score == "producer_l1":  # where undefined, the layer keeps KSE's choice
            counts = {n: (counts_by_score(c, _ranking_score(by_name[n], score))
                          if torch.isfinite(by_name[n].scores["producer_l1"]).all() else c.clone())
                      for n, c in kse_counts.items()}
        else:
            counts = {n: counts_by_score(c, _ranking_score(by_name[n], score)) for n, c in kse_counts.items()}
        pruned = _with_counts(model, plans, counts, cfg)
        if score == "kse" and clustered_out is not None:
            clustered_out.update({n: pruned.get_submodule(n).weight.detach().cpu() for n in kse_counts})
        row = {"top1_dropped_only": round(_top1(_dropped_only(model, counts), eval_loader, device), 3),
               "top1": round(_top1(pruned, eval_loader, device), 3),
               "dropped": int(sum(int((c == 0).sum()) for c in counts.values())),
               "centroids": int(sum(int(c.sum()) for c in counts.values())),
               "same_as_kse": sum(int(torch.equal(counts[n] > 0, kse_counts[n] > 0)) for n in counts)}
        if recal_loader is not None:
            recalibrate_bn_(pruned, recal_loader, batches=recal_batches)
            row["top1_recalibrated"] = round(_top1(pruned, eval_loader, device), 3)
        return score, row

    rows: Dict[str, Any] = {}
    baseline = float("nan")
    for score, row in _map_threads(one, [None] + scores, workers):
        if score is None:
            baseline = row["top1"]
            _say(progress, f"drop: intact model top-1 {baseline:.2f}%")
            continue
        rows[score] = row
        _say(progress, f"drop: {score}: top-1 {row['top1']:.2f}%"
                       + (f", {row['top1_recalibrated']:.2f}% after BatchNorm recalibration" if recal_loader else ""))
    return {"baseline_top1": round(baseline, 3), "recal_batches": recal_batches if recal_loader is not None else 0,
            "rows": {s: rows[s] for s in scores}}


# ----------------------------------------------------------------------------- everything
def choose_images(available: int, n: int, seed: Optional[int] = None) -> Tuple[List[int], List[int]]:
    """``(chosen, rest)``: indices of ``n`` of ``available`` images and the others, in order.
    Without a seed the first ``n`` (deterministic: two runs, or two tools, score the same
    images); with one, ``n`` drawn at random."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"the number of images must be an integer >= 1, got {n!r}")
    if n > available:
        raise ValueError(f"{n} images asked for, the split has {available}; use at most {available}")
    if seed is None:
        return list(range(n)), list(range(n, available))
    perm = torch.randperm(available, generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = sorted(perm[:n])
    taken = set(chosen)
    return chosen, [i for i in range(available) if i not in taken]


def match_layers(model: nn.Module, patterns: Optional[Sequence[str]], config: KSEConfig,
                 example: Optional[Tensor] = None) -> List[str]:
    """The layers KSE compresses (``select_layers``) that match any glob in ``patterns``
    (all of them when ``patterns`` is empty or None); none matching is an error."""
    eligible = select_layers(model, config, example)
    if not patterns:
        chosen = eligible
    else:
        chosen = [n for n in eligible if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        shown = ", ".join(eligible[:6]) + (" ..." if len(eligible) > 6 else "")
        raise ValueError(f"no layer matches {list(patterns or [])}: the layers KSE compresses in this model are "
                         f"{shown or '(none)'}; give glob patterns such as 'layer2.*'")
    return chosen


def explain(model: nn.Module, images: Tensor, labels: Tensor, layers: Optional[Sequence[str]] = None,
            config: Optional[KSEConfig] = None, eval_loader=None, recal_loader=None, recal_batches: int = 8,
            rows: int = DEFAULT_ROWS, batch_size: int = 128, resamples: int = 1000, seed: int = 0,
            show_layer: Optional[str] = None, show_images: int = 4, drop_scores: Iterable[str] = DROP_SCORES,
            progress: Progress = None, workers: Optional[int] = None) -> Explanation:
    """Score every input channel of the chosen layers with KSE and on the images; compare.

    Args:
        model: a trained network returning logits (not changed; run in eval mode).
        images: ``Tensor[B, C, H, W]``, preprocessed; labels: ``LongTensor[B]``.
        layers: glob patterns of layer names (default: every layer KSE compresses).
        config: :class:`KSEConfig` (G, T, alpha, k of the indicator and counts; default G=4).
        eval_loader: test batches for item 3 (None: no item 3).
        recal_loader, recal_batches: unlabeled training batches to re-estimate BatchNorm
            statistics with in item 3 (None: no recalibrated column).
        rows: image copies per forward in the ablation (memory bound).
        batch_size: images per forward and backward in the Taylor pass.
        resamples, seed: bootstrap resamples; seed of the random score and the bootstrap.
        show_layer: the layer whose input maps are kept for the feature-map picture (default:
            the middle one); show_images: how many images of it.
        progress: called with a line of text as the work goes (e.g. ``kse.ablation.stderr_progress``).
        workers: layers (ablation) and scores (item 3) worked on at the same time, one intra-op
            thread each (default: on CPU, ``torch.get_num_threads()``).
    """
    cfg = config if config is not None else KSEConfig()
    if not isinstance(cfg, KSEConfig):
        raise TypeError(f"config must be a kse.KSEConfig, got {type(cfg).__name__}")
    if not torch.is_tensor(images) or images.ndim != 4 or len(images) < 1:
        raise ValueError("images must be a non-empty Tensor[B, C, H, W], got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be an integer >= 1, got {resamples!r}")
    timings: Dict[str, float] = {}
    t0 = time.time()
    device = next(model.parameters()).device
    example = images[:2].to(device)
    names = match_layers(model, layers, cfg, example)
    if show_layer is not None and show_layer not in names:
        raise ValueError(f"show_layer {show_layer!r} is not among the explained layers ({', '.join(names[:4])} ...)")
    free = data_free_scores(model, names, cfg, example)
    timings["data_free"] = time.time() - t0
    _say(progress, f"explain: {len(names)} layers, {sum(f['plan'].in_channels for f in free.values())} input "
                   f"channels, {len(images)} images")

    t = time.time()
    ablation = ablation_importance(model, names, images, labels, rows=rows, progress=progress, workers=workers)
    timings["ablation"] = time.time() - t
    t = time.time()
    taylor = taylor_importance(model, names, images, labels, batch_size=batch_size)
    timings["taylor"] = time.time() - t

    gen = torch.Generator().manual_seed(seed)
    result_layers = []
    for name in names:
        p = free[name]["plan"]
        scores = dict(free[name]["scores"])
        scores["loss_increase"] = ablation[name].loss_increase
        scores["top1_drop"] = ablation[name].top1_drop
        scores["loss_increase_even"], scores["loss_increase_odd"] = ablation[name].loss_increase_halves
        scores["taylor"] = taylor[name]["taylor"]
        scores["activation"] = taylor[name]["activation"]
        scores["random"] = torch.rand(p.in_channels, generator=gen, dtype=torch.float64)
        result_layers.append(LayerExplanation(name, p.in_channels, p.out_channels, scores, free[name]["producer"]))

    t = time.time()
    agree = agreement(result_layers, resamples=resamples, seed=seed)
    agree_abs = agreement(result_layers, resamples=resamples, seed=seed, magnitude=True)
    # how reproducible the ablation ranking is: even-indexed images against odd-indexed ones
    split_half = (agreement(result_layers, ["loss_increase_even"], "loss_increase_odd", resamples, seed)
                  ["loss_increase_even"] if len(images) >= 4 else None)
    timings["agreement"] = time.time() - t

    drop = None
    clustered: Dict[str, Tensor] = {}
    if eval_loader is not None:
        t = time.time()
        drop = drop_experiment(model, result_layers, [free[n]["plan"] for n in names], cfg, eval_loader,
                               recal_loader, recal_batches, drop_scores, device, progress, clustered, workers)
        timings["drop"] = time.time() - t

    shown = show_layer if show_layer is not None else names[len(names) // 2]
    maps = capture_layer_inputs(model, [shown], images[:show_images].to(device))[shown].cpu()
    base = next(iter(ablation.values()))
    settings = {"layers": names, "images": len(images), "G": cfg.G, "T": cfg.T, "alpha": cfg.alpha, "k": cfg.k,
                "seed": seed, "bootstrap_resamples": resamples, "recal_batches": recal_batches,
                "base_loss": round(base.base_loss, 6), "base_top1": round(base.base_top1, 3)}
    timings["total"] = time.time() - t0
    return Explanation(result_layers, agree, drop, settings, timings, agreement_magnitude=agree_abs,
                       split_half=split_half,
                       feature_maps={"layer": shown, "maps": maps, "labels": labels[:show_images].tolist(),
                                     "images": images[:show_images].detach().cpu()},
                       clustered=clustered,
                       weights={n: model.get_submodule(n).weight.detach().cpu().clone() for n in names})
