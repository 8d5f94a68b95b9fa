"""Compress to a budget: choose KSE's G and T (KSE Eq. 8) so that the compressed model meets
a MAC, parameter, stored-size or latency target.

Li et al., "Exploiting Kernel Sparsity and Entropy for Interpretable CNN Compression",
CVPR 2019. Eq. 8 turns the indicator ``v_c`` of every input channel (Eq. 7, in [0, 1] within
its layer) into a number of centroids ``q_c`` with one G and one T for all layers; the paper
picks them by hand. Given a target instead:

1. the paper's rule first: every global setting of a grid (``G = 2..8``, ``T = 0..3``) is
   costed, and the one nearest the target from below is taken when it is within 2% of it;
2. otherwise a per-layer allocation. NOTE: a departure from the paper, which uses one G for
   every layer. Each layer takes one of the centroid-count vectors that the grid gives it,
   or stays dense, so that the layers together give up the least indicator mass

       loss_l = sum_c v_c d_c / ((log2 N + 1) sum_c v_c),
       d_c = log2(N / q_c) for q_c > 0 (centroid halvings), log2 N + 1 for q_c = 0 (pruned)

   within the budget: each halving of a channel's centroids costs its indicator, as in
   Eq. 8 itself, where ``log2 q_c`` grows linearly with ``v_c``; pruning costs one halving
   more than keeping a single centroid. The indicator is normalised within each layer, so
   ``loss_l`` (0: the layer stays dense, 1: every channel pruned) is a fraction of each layer's
   own mass: every layer counts alike, as under one global G. That is a multiple-choice
   knapsack, solved exactly by dynamic programming over the budget (:func:`allocate`).

Costs come from counts, not from compressed models: the indicators are computed once, a
setting's centroid counts are Eq. 8 applied to them, and MACs, parameters and stored bits follow
from the counts as :func:`kse.profile` counts them (the paper's Fig. 2 deployment: 2D part
``sum_c q_c kh kw H'W'`` MACs, ``sum_c q_c kh kw`` centroid weights, ``ceil(log2 q_c)`` index
bits per kernel). Only the chosen setting is clustered; its real cost after dead-channel removal
is then counted from the built layers, and when it misses the window the search is corrected and
run again (clusters are cached by layer and counts, never recomputed). A latency target times
every layer's deploy forms once per setting on this machine, adds them up, and checks the
chosen model with a real measurement.

Example::

    >>> import kse
    >>> from kse.models import get_model
    >>> net = get_model("resnet20", num_classes=10).eval()
    >>> kse.compress_(net, kse.KSEConfig(target_macs="2x", input_size=(3, 32, 32)))  # doctest: +SKIP
    >>> net.kse_budget["line"]                                                        # doctest: +SKIP
    'budget MACs <= 20.59M (2x): per-layer G/T (...) -> MACs 20.41M, params ..., stored ...'
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .conv import KSEConv2d
from .indicator import centroid_counts
from .module_utils import capture_layer_inputs, eval_mode

QUANTITIES = ("macs", "params", "bytes", "latency_ms")
FIELDS = {"macs": "target_macs", "params": "target_params", "bytes": "target_bytes", "latency_ms": "target_latency_ms"}
TOLERANCE = 0.02  # the result lies in [(1 - TOLERANCE) * target, target]
GROUPS = tuple(range(2, 9))  # the grid of settings searched, globally and per layer
SHIFTS = tuple(range(0, 4))
_CELLS = 1 << 14  # resolution of the knapsack over the part of the budget that the layers can move
_ROUNDS = 4  # choose, build, count / measure, correct: at most this many times

_UNITS = {
    "macs": ("", "K", "M", "G"),
    "params": ("", "K", "M", "G"),
    "bytes": ("", "B", "K", "KB", "M", "MB", "G", "GB", "KiB", "MiB", "GiB"),
    "latency_ms": ("", "ms", "s", "us"),
}
_SCALE = {"": 1.0, "b": 1.0, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 2.0 ** 10, "mib": 2.0 ** 20, "gib": 2.0 ** 30}
_TIME_SCALE = {"": 1.0, "ms": 1.0, "s": 1e3, "us": 1e-3}
_EXAMPLE = {"macs": "'40M'", "params": "'300K'", "bytes": "'1MiB'", "latency_ms": "'3ms'"}
_NUMBER = re.compile(r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)([a-z]*)")
_LABEL = {"macs": "MACs", "params": "params", "bytes": "stored size", "latency_ms": "latency"}


# ----------------------------------------------------------------------------- targets
def parse_target(value: Union[int, float, str], quantity: str, name: str = "target") -> Union[float, str]:
    """A budget as a positive float (MACs, parameters, bytes or milliseconds), or a ratio to the
    input model kept as a string ``"2.5x"`` (resolved by :func:`resolve_target`).

    Accepts numbers and strings with a unit: ``"40M"`` / ``"300K"`` (MACs, params: K, M, G),
    ``"1MiB"`` / ``"1.5MB"`` (bytes: B, K/KB, M/MB, G/GB, KiB, MiB, GiB), ``"3ms"`` (ms, s, us).

        >>> parse_target("1MiB", "bytes"), parse_target("2.50x", "macs")
        (1048576.0, '2.5x')
    """
    if quantity not in _UNITS:
        raise ValueError(f"quantity must be one of {', '.join(map(repr, QUANTITIES))}, got {quantity!r}")
    hint = f"a positive number, a string such as {_EXAMPLE[quantity]}, or a ratio to the input model such as '2.5x'"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{name} must be {hint}, got {type(value).__name__}")
    if isinstance(value, str):
        match = _NUMBER.fullmatch(value.strip().replace(" ", "").replace("_", "").lower())
        units = {u.lower() for u in _UNITS[quantity]}
        if match is None or match.group(2) not in units | {"x"}:
            raise ValueError(f"{name}: cannot read {value!r}; give {hint} "
                             f"(units: {', '.join(u for u in _UNITS[quantity] if u)}, or x)")
        number, unit = float(match.group(1)), match.group(2)
        if unit == "x":
            if not (math.isfinite(number) and number > 1):
                raise ValueError(f"{name}: a ratio to the input model must be > 1 (how many times smaller "
                                 f"or faster), got {value!r}")
            return f"{number:g}x"
        value = number * (_TIME_SCALE if quantity == "latency_ms" else _SCALE)[unit]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be {hint}, got {value!r}")
    return float(value)


def resolve_target(value: Union[float, str], baseline: float) -> float:
    """The absolute target: ``value`` itself, or ``baseline / ratio`` for a ratio ``"2.5x"``."""
    if isinstance(value, str):
        return baseline / float(value[:-1])
    return float(value)


def format_quantity(quantity: str, value: float) -> str:
    from .report import fmt_bytes, fmt_count

    if quantity == "bytes":
        return fmt_bytes(value)
    if quantity == "latency_ms":
        return f"{value:.3g} ms"
    return fmt_count(value)


# ----------------------------------------------------------------------------- per-layer options
@dataclass(frozen=True)
class LayerOption:
    """One choice for a layer: a KSE setting (its centroid counts) or staying dense."""

    setting: Optional[Tuple[int, int]]  # (G, T); None: the layer stays a dense nn.Conv2d
    counts: Optional[Tensor]  # LongTensor[C_in] from Eq. 8; None when dense
    loss: float  # indicator mass given up, in [0, 1]

    @property
    def label(self) -> str:
        return "dense" if self.setting is None else f"G={self.setting[0]} T={self.setting[1]}"


def indicator_loss(indicator: Tensor, counts: Tensor, out_channels: int) -> float:
    """The fraction of a layer's indicator mass that centroid counts give up, in [0, 1]:

        sum_c v_c d_c / ((log2 N + 1) sum_c v_c),  d_c = log2(N / q_c), or log2 N + 1 when q_c = 0

    (``N = 16``: a channel with N/4 centroids gives up 2/5 of its ``v_c``, a pruned one all of it).
    """
    return _loss(indicator.detach().double().cpu().numpy(), counts.detach().cpu().numpy(), out_channels)


def _loss(v: np.ndarray, q: np.ndarray, out_channels: int) -> float:
    full = math.log2(out_channels) + 1
    total = float(v.sum()) * full
    if total <= 0:
        return 0.0
    halvings = np.where(q > 0, np.log2(out_channels / np.maximum(q, 1)), full)
    return float((v * halvings).sum()) / total


def layer_options(indicator: Tensor, out_channels: int, groups: Sequence[int] = GROUPS,
                  shifts: Sequence[int] = SHIFTS) -> Tuple[List[LayerOption], Dict[Tuple[int, int], int]]:
    """The distinct choices for one layer: dense first, then each distinct count vector that
    a ``(G, T)`` of the grid gives (Eq. 8), labelled by the first setting that gives it.

    Returns ``(options, index)`` with ``index[(G, T)]`` the position of that setting's option.
    """
    centroid_counts(indicator, out_channels, groups[0], shifts[0])  # checks the arguments once
    v = indicator.detach().double().cpu().numpy()
    options = [LayerOption(None, None, 0.0)]
    index: Dict[Tuple[int, int], int] = {}
    seen: Dict[bytes, int] = {}
    for G, T in itertools.product(groups, shifts):
        q = _counts(v, out_channels, G, T)
        key = q.tobytes()
        if key not in seen:
            seen[key] = len(options)
            options.append(LayerOption((G, T), torch.from_numpy(q), _loss(v, q, out_channels)))
        index[(G, T)] = seen[key]
    return options, index


def _counts(v: np.ndarray, N: int, G: int, T: int) -> np.ndarray:
    """:func:`kse.centroid_counts` (Eq. 8) on a float64 array, for the many settings a search
    tries (a test checks that they agree)."""
    vG = v * G
    g = np.floor(vG).astype(np.int64)
    shift = np.clip(T + G - 1 - g, 0, N.bit_length())  # q = ceil(N / 2^shift), in integers
    q = np.minimum((N + np.left_shift(np.int64(1), shift) - 1) >> shift, N)
    q = np.where(g == 0, 0, q)
    q = np.where(np.ceil(vG) == G, N, q)
    return q.astype(np.int64)


def allocate(costs: Sequence[Sequence[float]], losses: Sequence[Sequence[float]], budget: float,
             cells: int = _CELLS) -> Optional[List[int]]:
    """One option per layer, minimising the summed loss with the summed cost at most ``budget``
    (a multiple-choice knapsack, by dynamic programming over the budget).

    Costs above each layer's cheapest option are rounded *up* to units of the budget left
    over the cheapest choice divided by ``cells`` (to units of 1 when the costs are integers
    and that fits in ``cells``: then the answer is exact), so the answer never exceeds the
    budget; with rounding it is optimal among the choices that fit ``layers * unit`` under it.
    Ties go to the option listed first. Returns the option index per layer, or None when even
    the cheapest choice does not fit.
    """
    base = [min(row) for row in costs]
    room = budget - sum(base)
    if room < 0 or not costs:
        return None if room < 0 else []
    extra = [np.asarray(row, dtype=np.float64) - b for row, b in zip(costs, base)]
    integral = all(float(c).is_integer() for row in costs for c in row) and float(budget).is_integer()
    unit = 1.0 if integral and room <= cells else room / cells
    cap = int(math.floor(room / unit + 1e-9)) if unit == 1.0 else cells
    best = np.zeros(cap + 1)  # best[c]: least loss of the layers so far with extra cost <= c units
    picks, weights = [], []
    for row, loss in zip(extra, losses):
        w = np.ceil(row / unit).astype(np.int64)
        table = np.full((len(w), cap + 1), np.inf)
        for k, (wk, lk) in enumerate(zip(w, loss)):
            if wk <= cap:
                table[k, wk:] = best[:cap + 1 - wk] + lk
        pick = table.argmin(0)  # first minimum: ties go to the option listed first
        best = table[pick, np.arange(cap + 1)]
        picks.append(pick)
        weights.append(w)
    if not np.isfinite(best[cap]):
        return None
    choice, c = [], cap
    for pick, w in zip(reversed(picks), reversed(weights)):
        k = int(pick[c])
        choice.append(k)
        c -= int(w[k])
    return choice[::-1]


# ----------------------------------------------------------------------------- counting
def _own_bits(m: nn.Module) -> int:
    bits = sum(p.numel() * p.element_size() * 8 for p in m.parameters(recurse=False))
    return bits + sum(b.numel() * b.element_size() * 8 for b in m.buffers(recurse=False) if b.is_floating_point())


def _index_bits(q: np.ndarray, whole: np.ndarray) -> np.ndarray:
    """Bits per stored index of each kept channel: 0 for q = 1 or a channel kept whole."""
    q = np.maximum(q, 1)
    return np.where((q == 1) | whole, 0, np.ceil(np.log2(q))).astype(np.int64)


def _model_macs(model: nn.Module, input_size: Tuple[int, ...]) -> Tuple[int, Dict[str, int]]:
    """The model's MACs as :func:`kse.profile` counts them, and ``H'W'`` of every convolution's
    output. Shapes only: the forward runs on meta tensors (no arithmetic) where it can."""
    from torch.utils.flop_counter import FlopCounterMode

    from .profile import profile

    hw: Dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: hw.__setitem__(n, int(o.shape[-2] * o.shape[-1])))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, KSEConv2d))]
    try:
        if not any(isinstance(m, KSEConv2d) for m in model.modules()):
            p = next(model.parameters(), None)
            dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
            state = {n: torch.empty_like(t, device="meta") for n, t in itertools.chain(
                model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))}
            try:
                with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
                    torch.func.functional_call(model, state, (torch.empty(1, *input_size, device="meta", dtype=dtype),))
                return int(counter.get_total_flops()) // 2, hw
            except Exception:  # noqa: BLE001 - e.g. data-dependent control flow: count on real tensors
                hw.clear()
        return profile(model, input_size).macs, hw
    finally:
        for h in hooks:
            h.remove()


@dataclass
class BudgetResult:
    """What :func:`fit_to_target_` chose and what it got."""

    quantity: str
    target: float  # absolute, in the quantity's unit (bytes, ms, MACs, params)
    requested: Union[float, str]
    baseline: float
    setting: str  # "G=5 T=0 (every layer)" or "per layer: 30x G=4 T=0, ..."
    layers: Dict[str, str]  # layer -> "G=4 T=0" or "dense"
    macs: int
    params: int
    stored_bytes: int
    latency_ms: Optional[float] = None
    latency_batch: int = 1
    achieved: float = 0.0
    notes: List[str] = field(default_factory=list)

    def line(self) -> str:
        from .report import fmt_bytes, fmt_count

        asked = format_quantity(self.quantity, self.target)
        if isinstance(self.requested, str):
            asked += f" ({self.requested} of {format_quantity(self.quantity, self.baseline)})"
        batch = f" at batch {self.latency_batch}" if self.quantity == "latency_ms" else ""
        got = (f"MACs {fmt_count(self.macs)}, params {fmt_count(self.params)}, "
               f"stored {fmt_bytes(self.stored_bytes)}")
        if self.latency_ms is not None:
            got += f", latency {self.latency_ms:.3g} ms (measured, batch {self.latency_batch})"
        return f"budget {_LABEL[self.quantity]} <= {asked}{batch}: {self.setting} -> {got}"

    def as_dict(self) -> Dict:
        d = dataclasses.asdict(self)
        d["line"] = self.line()
        return d


# ----------------------------------------------------------------------------- the search
class _Search:
    """Options, costs and caches for one model and config; :meth:`run` picks and builds."""

    def __init__(self, model: nn.Module, cfg, plans, example: Tensor) -> None:
        from .dead_channels import ChannelGraph

        self.model, self.cfg, self.plans, self.example = model, cfg, plans, example
        self.input_size = tuple(example.shape[1:])
        self.names = [p.name for p in plans]
        self.seed_index = {p.name: i for i, p in enumerate(plans)}
        self.convs = [model.get_submodule(n) for n in self.names]
        built = [layer_options(p.indicator, p.out_channels) for p in plans]
        self.options = [b[0] for b in built]
        self.setting_index = [b[1] for b in built]
        self.base_macs, self.hw = _model_macs(model, self.input_size)
        self._rows: Dict[str, np.ndarray] = {}
        params = sum(p.numel() for p in model.parameters())
        bits = sum(self._module_cost(n, m)[2] for n, m in model.named_modules())
        self.base = np.array([self.base_macs, params, bits], dtype=np.int64)
        self.graph = ChannelGraph.build(model, example) if cfg.remove_dead_channels else None
        self.build_cfg = cfg if self.graph is not None else dataclasses.replace(cfg, remove_dead_channels=False)
        self.clusters: dict = {}
        self.separable = [[self._kse_cost(i, o.counts) if o.counts is not None else self._row(name)
                           for o in opts] for i, (name, opts) in enumerate(zip(self.names, self.options))]
        self.latency: Optional[Tuple[float, List[List[float]], float]] = None

    # -- counting
    def _module_cost(self, name: str, m: nn.Module) -> np.ndarray:
        """``[MACs, params, stored bits]`` of one module's own tensors, as kse.profile counts them."""
        from .profile import kse_layer_bits

        params = sum(p.numel() for p in m.parameters(recurse=False))
        hw = self.hw.get(name, 0)
        if isinstance(m, KSEConv2d):
            kh, kw = m.kernel_size
            return np.array([int(m.centroid_counts.sum()) * kh * kw * hw, sum(p.numel() for p in m.parameters()),
                             kse_layer_bits(m)], dtype=np.int64)
        if isinstance(m, nn.Conv2d):
            macs = m.weight.numel() * hw
            return np.array([macs, params, _own_bits(m)], dtype=np.int64)
        return np.array([0, params, _own_bits(m)], dtype=np.int64)

    def _row(self, name: str) -> np.ndarray:
        if name not in self._rows:
            self._rows[name] = self._module_cost(name, self.model.get_submodule(name))
        return self._rows[name]

    def _kse_cost(self, i: int, counts: Tensor, removed_out: Sequence[int] = (), removed_in: int = 0) -> np.ndarray:
        """Cost of layer ``i`` compressed with ``counts``, after removing output channels
        ``removed_out`` and ``removed_in`` of its (dropped) input channels. Exact when the
        layer's clusters for ``counts`` are cached; else an upper bound (a clustered channel
        keeps every centroid that still could have a member)."""
        name, conv = self.names[i], self.convs[i]
        N, C = conv.out_channels, conv.in_channels
        kh, kw = conv.kernel_size
        q = counts.numpy()
        qk = q[q > 0]
        whole = qk == N
        n_out = N - len(removed_out)
        found = self.clusters.get((self.seed_index[name], tuple(q.tolist()))) if removed_out else None
        if found is not None:
            keep = torch.ones(N, dtype=torch.bool)
            keep[list(removed_out)] = False
            rows = found[2][:, keep].sort(dim=1).values
            qk = ((rows[:, 1:] != rows[:, :-1]).sum(1) + 1).numpy() if rows.shape[1] else np.zeros_like(qk)
        elif removed_out:
            qk = np.minimum(qk, n_out)
        width = conv.weight.element_size() * 8
        weights = int(qk.sum()) * kh * kw
        params = weights + (n_out if conv.bias is not None else 0)
        bits = params * width + (C - removed_in) + n_out * int(_index_bits(qk, whole).sum())
        return np.array([int(qk.sum()) * kh * kw * self.hw.get(name, 0), params, bits], dtype=np.int64)

    def counts_of(self, choice: Sequence[int]) -> Dict[str, Tensor]:
        return {name: opts[k].counts for name, opts, k in zip(self.names, self.options, choice)
                if opts[k].counts is not None}

    def estimate(self, choice: Sequence[int]) -> np.ndarray:
        """``[MACs, params, stored bits]`` of the model compressed with ``choice`` (an option
        per layer), dead channels removed, without clustering (see ``_kse_cost``)."""
        removal = (self.graph.dead_channels(self.counts_of(choice), self.cfg.channel_multiple)
                   if self.graph is not None else {})
        total = self.base.copy()
        for i, (name, k) in enumerate(zip(self.names, choice)):
            rm = removal.get(name)
            counts = self.options[i][k].counts
            if rm is None:
                total += self.separable[i][k] - self._row(name)
            elif counts is None:  # a dense producer losing outputs
                total += self._shrunk_cost(name, len(rm["out"])) - self._row(name)
            else:
                total += self._kse_cost(i, counts, sorted(rm["out"]), len(rm["in"])) - self._row(name)
        selected = set(self.names)
        for name, rm in removal.items():
            if name not in selected:
                total += self._shrunk_cost(name, len(rm["out"])) - self._row(name)
        return total

    def _shrunk_cost(self, name: str, removed_out: int) -> np.ndarray:
        """Cost of a plain conv or BatchNorm without ``removed_out`` output channels (every own
        tensor of both is per output channel, or the conv weight, per output channel too)."""
        m = self.model.get_submodule(name)
        width = m.out_channels if isinstance(m, nn.Conv2d) else m.num_features
        row = self._row(name)
        return row * (width - removed_out) // width

    def measure(self, final: Dict[str, nn.Module]) -> np.ndarray:
        """Exact ``[MACs, params, stored bits]`` once ``final`` replaces the model's modules."""
        total = self.base.copy()
        for name, module in final.items():
            total += self._module_cost(name, module) - self._row(name)
        return total

    # -- quantities
    def value(self, quantity: str, costs: np.ndarray) -> float:
        return float({"macs": costs[0], "params": costs[1], "bytes": math.ceil(costs[2] / 8)}[quantity])

    def _axis(self, quantity: str) -> int:
        return {"macs": 0, "params": 1, "bytes": 2}[quantity]

    # -- latency
    def prepare_latency(self, batch: int) -> float:
        """Time the dense model once, and every layer once in each option's fastest deploy form
        (on its real input); returns the dense model's median latency (ms)."""
        from .report import measure_latency
        from .timing import time_call

        timed = measure_latency(self.model, self.input_size, batch, warmup=2, repeats=10)
        p = next(self.model.parameters())
        x = torch.randn(batch, *self.input_size, generator=torch.Generator().manual_seed(self.cfg.seed))
        inputs = capture_layer_inputs(self.model, self.names, x.to(p.device, p.dtype))
        # "full" is the dense conv zero-filled over the dropped channels: the original's cost;
        # "dense" depends only on how many channels are kept: timed once per kept count
        forms = [f for f in latency_forms() if f != "full"]
        table, dense_total = [], 0.0
        for name, opts in zip(self.names, self.options):
            conv, inp = self.model.get_submodule(name), inputs[name]
            with eval_mode(conv):
                dense = time_call(conv, inp, warmup=1, repeats=5)["min_ms"]
            dense_total += dense
            row, by_kept = [], {}
            for opt in opts:
                if opt.counts is None:
                    row.append(dense)
                    continue
                layer, best = _timing_layer(conv, opt.counts).eval(), dense
                kept = int((opt.counts > 0).sum())
                for form in forms:
                    if form == "dense" and kept in by_kept:
                        best = min(best, by_kept[kept])
                        continue
                    try:
                        layer.set_form(form)
                    except ValueError:  # e.g. the fused kernel on a stride-2 layer
                        continue
                    t = time_call(layer, inp, warmup=1, repeats=3)["min_ms"]
                    if form == "dense":
                        by_kept[kept] = t
                    best = min(best, t)
                row.append(best)
            table.append(row)
        # parts are timed at their best (least disturbed by other load): what the layers leave
        # (activations, pooling, the classifier) is the model's best time less theirs; sums are
        # scaled by the model's median / best, to compare with a median measurement
        self.latency = (timed["min_ms"] - dense_total, table, timed["median_ms"] / timed["min_ms"])
        return timed["median_ms"]

    def latency_estimate(self, choice: Sequence[int]) -> float:
        fixed, table, scale = self.latency
        return scale * (fixed + sum(table[i][k] for i, k in enumerate(choice)))

    # -- choosing
    def _cost_of(self, quantity: str, choice: Sequence[int]) -> float:
        if quantity == "latency_ms":
            return self.latency_estimate(choice)
        return self.value(quantity, self.estimate(choice))

    def global_choice(self, quantity: str, goal: float, anywhere: bool = False) -> Optional[Tuple[List[int], str, float]]:
        """The global (G, T) with the largest cost within ``goal``, if it is within the window
        (``anywhere``: however far under ``goal`` it is)."""
        best = None
        for setting in itertools.product(GROUPS, SHIFTS):
            choice = [idx[setting] for idx in self.setting_index]
            cost = self._cost_of(quantity, choice)
            if cost <= goal and (best is None or cost > best[2]):
                best = (choice, f"G={setting[0]} T={setting[1]} (every layer)", cost)
        if best is not None and (anywhere or best[2] >= (1 - TOLERANCE) * goal):
            return best
        return None

    def layer_choice(self, quantity: str, goal: float) -> Optional[Tuple[List[int], str, float]]:
        """The knapsack's choice whose cost (dead channels removed) is nearest ``goal`` from
        below: the knapsack's budget is corrected until it lands within half the tolerance."""
        if quantity == "latency_ms":
            fixed, table, scale = self.latency
            costs, offset = [[scale * t for t in row] for row in table], scale * fixed
        else:
            axis = self._axis(quantity)
            costs = [[float(c[axis]) for c in row] for row in self.separable]
            offset = float(self.base[axis] - sum(self._row(n)[axis] for n in self.names))
            if quantity == "bytes":  # the knapsack counts bits
                costs = [[c / 8 for c in row] for row in costs]
                offset /= 8
        losses = [[o.loss for o in opts] for opts in self.options]
        budget, lo, hi, best = goal, None, None, None
        for _ in range(12):
            # None: even the cheapest choice exceeds the budget before dead channels are
            # removed; the cheapest one is then all there is to try
            choice = allocate(costs, losses, budget - offset) or [int(np.argmin(row)) for row in costs]
            cost = self._cost_of(quantity, choice)
            if cost <= goal:
                if best is None or cost > best[2]:
                    best = (choice, _describe(self.options, choice), cost)
                if cost >= (1 - TOLERANCE / 2) * goal:
                    break
                lo = budget
            else:
                hi = budget
            if lo is not None and hi is not None:
                budget = (lo + hi) / 2
            else:
                budget = budget * goal / max(cost, 1e-12)
        return best

    def smallest(self, quantity: str, global_only: bool = False) -> float:
        if global_only:
            return min(self._cost_of(quantity, [idx[s] for idx in self.setting_index])
                       for s in itertools.product(GROUPS, SHIFTS))
        axis = None if quantity == "latency_ms" else self._axis(quantity)
        if axis is None:
            choice = [int(np.argmin(row)) for row in self.latency[1]]
        else:
            choice = [int(np.argmin([c[axis] for c in row])) for row in self.separable]
        return self._cost_of(quantity, choice)


def latency_forms() -> Tuple[str, ...]:
    """The deploy forms a latency budget measures: :func:`kse.deploy_`'s, and the compiled
    kernel's where it builds (at batch 1 it is often the only form faster than the dense conv)."""
    from . import fused
    from .forms import INFERENCE_FORMS

    forms = tuple(INFERENCE_FORMS)
    return forms + ("fused",) if "fused" not in forms and fused.available() else forms


def _timing_layer(conv: nn.Conv2d, counts: Tensor) -> KSEConv2d:
    """A KSE layer with ``conv``'s geometry and ``counts``, filled with random centroids and a
    valid assignment: what its deploy forms cost does not depend on the values."""
    counts = counts.cpu()
    kept = torch.nonzero(counts).flatten()
    q = counts[kept]
    layer = KSEConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.bias is not None, kept, q)
    offsets = torch.zeros_like(q)
    if len(q) > 1:
        offsets[1:] = q.cumsum(0)[:-1]
    with torch.no_grad():
        layer.centroids.normal_(generator=torch.Generator().manual_seed(0))
        layer.assignment.copy_(offsets.unsqueeze(1) + torch.arange(conv.out_channels) % q.unsqueeze(1))
    return layer.to(conv.weight.device, conv.weight.dtype)


def _describe(options: List[List[LayerOption]], choice: Sequence[int]) -> str:
    tally = collections.Counter(opts[k].label for opts, k in zip(options, choice))
    parts = [f"{n}x {label}" for label, n in sorted(tally.items(), key=lambda kv: (-kv[1], kv[0]))]
    return "per layer: " + ", ".join(parts)


def fit_to_target_(model: nn.Module, cfg, plans, example: Tensor, verbose: bool = False):
    """Compress ``model`` in place to ``cfg``'s target (see the module docstring); the model's
    ``kse_budget`` attribute gets :meth:`BudgetResult.as_dict`. Returns the plans of the layers
    compressed, with the centroid counts chosen. ``plans`` are :func:`kse.plan`'s (their
    indicators are reused; their counts are not).

    Raises ``ValueError`` when the target is not below the input model or cannot be reached
    (the message gives the smallest reachable value), and for a latency target that no
    candidate met when measured.
    """
    from .compress import LayerPlan, build_replacements, swap_in

    quantity, requested = cfg.target()
    name = FIELDS[quantity]
    search = _Search(model, cfg, plans, example)
    if quantity == "latency_ms":
        baseline = search.prepare_latency(cfg.latency_batch)
    else:
        baseline = search.value(quantity, search.base)
    target = resolve_target(requested, baseline)
    shown = format_quantity(quantity, target)
    if target >= baseline:
        raise ValueError(f"{name}={requested!r} ({shown}) is not below the input model's "
                         f"{format_quantity(quantity, baseline)}: nothing to compress; give a smaller target")
    limit = math.floor(target) if quantity in ("macs", "params") else target
    allocation = cfg.allocation
    smallest = search.smallest(quantity, global_only=allocation == "global")
    if smallest > limit:
        which = ("every layer at the most compressing global setting" if allocation == "global" else
                 "every layer at its most compressed setting")
        raise ValueError(f"{name}={requested!r} ({shown}) cannot be reached: the smallest reachable is about "
                         f"{format_quantity(quantity, smallest)} ({which} of G={GROUPS[0]}..{GROUPS[-1]}, "
                         f"T={SHIFTS[0]}..{SHIFTS[-1]}); give at least that, or let more layers be compressed "
                         "(include / exclude)")

    def plans_for(choice):
        out = []
        for p, opts, k in zip(plans, search.options, choice):
            if opts[k].counts is not None:
                out.append(LayerPlan(p.name, p.in_channels, p.out_channels, p.indicator,
                                     opts[k].counts.to(p.indicator.device)))
        return out

    def build(choice):
        chosen = plans_for(choice)
        return chosen, build_replacements(model, chosen, search.build_cfg, example, clusters=search.clusters,
                                          graph=search.graph, seed_index=search.seed_index)

    measured: Dict[Tuple[int, ...], float] = {}
    built: Dict[Tuple[int, ...], tuple] = {}
    best: Optional[Tuple[float, Tuple[int, ...], str]] = None
    goal = limit
    for _ in range(_ROUNDS):
        found = None
        if allocation != "per-layer":  # the paper's rule first
            found = search.global_choice(quantity, goal, anywhere=allocation == "global")
        if found is None and allocation != "global":
            found = search.layer_choice(quantity, goal)
        if found is None:
            break
        choice, label, _ = found
        if all(opts[k].counts is None for opts, k in zip(search.options, choice)):
            break  # every layer dense: the input model itself, which is over the target
        key = tuple(choice)
        if key not in measured:
            chosen, (new, final) = build(choice)
            if quantity == "latency_ms":
                measured[key] = _measure_latency(model, new, final, example, search.input_size, cfg.latency_batch)
            else:
                measured[key] = search.value(quantity, search.measure(final))
            built[key] = (chosen, new, final, label)
        actual = measured[key]
        _log(verbose, f"kse: budget candidate {label}: {format_quantity(quantity, actual)}")
        if actual <= limit and (best is None or actual > best[0]):
            best = (actual, key, label)
        if (1 - TOLERANCE) * limit <= actual <= limit:
            break
        goal = goal * limit / actual
    if best is None:
        tried = ", ".join(format_quantity(quantity, v) for v in measured.values()) or "nothing"
        why = (f" at batch {cfg.latency_batch} (their per-layer timings predicted less; a busy machine measures "
               "slower)" if quantity == "latency_ms" else "")
        raise ValueError(f"{name}={requested!r} ({shown}) was not met: the candidates got {tried}{why}; "
                         "give a larger target")
    actual, key, label = best
    chosen, new, final, _ = built[key]
    swap_in(model, new, final, example)
    costs = search.measure(final)
    notes = []
    if actual < (1 - TOLERANCE) * limit:
        why = ("allocation='global' allows one setting for all layers" if allocation == "global"
               else "the settings available to these layers are too coarse to come closer")
        notes.append(f"{format_quantity(quantity, actual)} is more than {TOLERANCE:.0%} under the target: {why}")
        warnings.warn(f"kse budget: {notes[-1]}", RuntimeWarning, stacklevel=3)
    layers = {n: opts[k].label for n, opts, k in zip(search.names, search.options, key)}
    result = BudgetResult(quantity, target, requested, baseline, label, layers, int(costs[0]), int(costs[1]),
                          math.ceil(costs[2] / 8), actual if quantity == "latency_ms" else None,
                          cfg.latency_batch, actual, notes)
    model.kse_budget = result.as_dict()
    _log(verbose, f"kse: {result.line()}")
    return chosen


def _measure_latency(model, new, final, example, input_size, batch) -> float:
    """Swap the candidate in, deploy it in its fastest forms, time it, swap the original back."""
    from .compress import swap_in
    from .deploy import deploy_
    from .module_utils import set_module
    from .report import measure_latency

    originals = swap_in(model, new, final, example)
    try:
        if any(isinstance(m, KSEConv2d) for m in model.modules()):
            deploy_(model, form="auto", input_size=input_size, batch_size=batch, candidates=latency_forms())
        return measure_latency(model, input_size, batch, warmup=2, repeats=10)["median_ms"]
    finally:
        for name, module in originals.items():
            set_module(model, name, module)


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)
