"""``KSEConfig``: the hyper-parameters of one KSE compression, validated on creation.

Example::

    >>> from kse import KSEConfig
    >>> cfg = KSEConfig(G=5, T=1, exclude=["fc", "*.downsample.*"])
    >>> KSEConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> KSEConfig(target_macs="40M").target()   # a budget: G and T are searched (kse.budget)
    ('macs', 40000000.0)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch.nn as nn

from .indicator import check_groups_and_shift

FilterFn = Callable[[nn.Module, str], bool]
SCORES = ("kse", "sparsity", "entropy")
ENTROPY_LAYOUTS = ("paper", "official")
# budget fields and the quantity each one bounds (see kse.budget)
TARGET_FIELDS = {"target_macs": "macs", "target_params": "params", "target_bytes": "bytes",
                 "target_latency_ms": "latency_ms"}
Target = Optional[Union[float, str]]
ALLOCATIONS = ("auto", "global", "per-layer")
_BUDGET_DEFAULTS = {**{name: None for name in TARGET_FIELDS}, "latency_batch": 1, "allocation": "auto"}


def _int_at_least(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class KSEConfig:
    """What to compress and how.

    Attributes:
        G: number of indicator groups (KSE Eq. 8), integer in [2, 2**20].
        T: shift of the centroid counts, integer in [0, 2**20] (the paper uses T=1 on ImageNet).
        alpha: weight of the entropy in the indicator, >= 0 (official code: 1).
        k: nearest neighbours for the kernel entropy, >= 1 (official code: 5).
        score: what ranks the input channels: ``"kse"`` (Eq. 7, the method), or for ablations
            ``"sparsity"`` (sparsity alone, the same as ``alpha=0``) or ``"entropy"`` (entropy
            alone: ``v = sqrt(1 / (1 + e))``).
        entropy_layout: ``"paper"`` (entropy over the N kernels of each input channel, the
            method) or ``"official"`` (the authors' code's reshape bug, for the ablation only).
        seed: seed of the k-means++ initialisation (results are deterministic for a seed).
        kmeans_iters: maximum Lloyd iterations per k-means.
        n_init: k-means restarts, the best by inertia is kept.
        include: glob patterns of layer names to consider (empty: every conv). Grouped and
            depthwise convolutions are always left alone (KSE needs groups == 1).
        exclude: glob patterns of layer names never to compress.
        skip_first: leave the convolution that reads the network input alone.
        remove_dead_channels: physically remove producer channels no layer reads any more.
        channel_multiple: when removing them, keep each producer's width a multiple of this
            (8: widths the CPU/GPU kernels handle well; 1: remove every dead channel).
        input_size: ``(C, H, W)`` used to trace the model for dead-channel removal; default:
            the model's recorded preprocessing, else ``(C_in, 64, 64)``.
        target_macs, target_params, target_bytes, target_latency_ms: a budget for the
            compressed model, at most one of them: MACs, parameters, stored bytes (as
            :func:`kse.profile` counts them) or latency in ms at batch ``latency_batch`` on this
            machine. A positive number, a string with a unit (``"40M"``, ``"300K"``, ``"1MiB"``,
            ``"3ms"``) or a ratio to the input model (``"2.5x"``: 2.5 times smaller / faster).
            With a target, ``G`` and ``T`` are not used: :mod:`kse.budget` searches them.
        latency_batch: batch size at which ``target_latency_ms`` is measured.
        allocation: how a target is met: ``"auto"`` (one global G/T as the paper when one is
            within 2% of the target, else a per-layer choice), ``"global"`` (the paper's rule
            only: the global setting nearest the target from below, however far) or
            ``"per-layer"`` (the per-layer choice only).
        filter_fn: optional ``fn(module, name) -> bool``; a layer is compressed only when it
            returns True (not serialised).
    """

    G: int = 4
    T: int = 0
    alpha: float = 1.0
    k: int = 5
    score: str = "kse"
    entropy_layout: str = "paper"
    seed: int = 0
    kmeans_iters: int = 50
    n_init: int = 1
    include: List[str] = field(default_factory=list)
    exclude: List[str] = field(default_factory=list)
    skip_first: bool = True
    remove_dead_channels: bool = True
    channel_multiple: int = 8
    input_size: Optional[Tuple[int, int, int]] = None
    target_macs: Target = None
    target_params: Target = None
    target_bytes: Target = None
    target_latency_ms: Target = None
    latency_batch: int = 1
    allocation: str = "auto"
    filter_fn: Optional[FilterFn] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_groups_and_shift(self.G, self.T)
        _int_at_least("k", self.k, 1)
        _int_at_least("seed", self.seed, 0)
        _int_at_least("kmeans_iters", self.kmeans_iters, 1)
        _int_at_least("n_init", self.n_init, 1)
        _int_at_least("channel_multiple", self.channel_multiple, 1)
        for name in ("skip_first", "remove_dead_channels"):
            value = getattr(self, name)
            if not isinstance(value, bool):  # "no" or "false" from a config file would read as true
                raise ValueError(f"{name} must be true or false, got {value!r}")
        if (not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool)
                or not math.isfinite(self.alpha) or self.alpha < 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        for name, allowed in (("score", SCORES), ("entropy_layout", ENTROPY_LAYOUTS), ("allocation", ALLOCATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
                raise TypeError(f"{name} must be a list of glob patterns (strings), got {value!r}")
            setattr(self, name, list(value))
        if self.input_size is not None:
            size = tuple(self.input_size)
            if len(size) != 3 or not all(isinstance(s, int) and s > 0 for s in size):
                raise ValueError(f"input_size must be (C, H, W) of positive integers, got {self.input_size!r}")
            self.input_size = size
        self._check_targets()
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"filter_fn must be callable as fn(module, name), got {type(self.filter_fn).__name__}")

    def _check_targets(self) -> None:
        from .budget import parse_target

        given = [name for name in TARGET_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one budget target, got {', '.join(given)}; keep the one that matters")
        for name in given:
            setattr(self, name, parse_target(getattr(self, name), TARGET_FIELDS[name], name))
        _int_at_least("latency_batch", self.latency_batch, 1)
        if self.latency_batch != 1 and self.target_latency_ms is None:
            raise ValueError(f"latency_batch={self.latency_batch} applies to a latency budget only; "
                             "give target_latency_ms too, or leave latency_batch at 1")

    def target(self) -> Optional[Tuple[str, Union[float, str]]]:
        """``(quantity, value)`` of the budget (``"macs"``, ``"params"``, ``"bytes"`` or
        ``"latency_ms"``; a number, or a ratio such as ``"2.5x"``), or None without one."""
        for name, quantity in TARGET_FIELDS.items():
            if getattr(self, name) is not None:
                return quantity, getattr(self, name)
        return None

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dict (``filter_fn`` is not included; the budget fields only when set,
        so that a compression without a budget is recorded as before they existed)."""
        d = asdict(self)
        d.pop("filter_fn")
        if d["input_size"] is not None:
            d["input_size"] = list(d["input_size"])
        for name, default in _BUDGET_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "KSEConfig":
        names = {f.name for f in fields(cls)} - {"filter_fn"}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown KSEConfig keys {sorted(unknown)}; valid keys: {sorted(names)}")
        return cls(**data)
