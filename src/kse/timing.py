"""Wall-clock timing of a call, synchronising CUDA when the input lives there."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Sequence

import torch
from torch import Tensor


def time_call(fn: Callable[[Tensor], Any], x: Tensor, warmup: int = 3, repeats: int = 20) -> Dict[str, float]:
    """Median / min wall time of ``fn(x)`` in milliseconds, after ``warmup`` calls, under
    ``torch.no_grad`` (inference: an eval-mode KSE layer called with gradients enabled runs its
    differentiable training form, not its deployed one)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        sync()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats}


def time_interleaved(fns: Sequence[Callable[[Tensor], Any]], x: Tensor, rounds: int = 10,
                     repeats: int = 4, warmup: int = 2) -> List[Dict[str, float]]:
    """Time several callables on ``x`` in ``rounds`` interleaved rounds; for each, the best
    round's median (``median_ms``) and every round's (``rounds_ms``).

    Interleaving makes slow drift hit every callable alike, and the best round keeps bursts of
    load from outside the process out of the figures: on a shared machine a model can run
    more than twice as slowly for seconds at a time, and not every kernel slows alike, so such
    bursts change ratios too.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    per_round: List[List[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for times, fn in zip(per_round, fns):
            times.append(time_call(fn, x, warmup, repeats)["median_ms"])
    return [{"median_ms": min(t), "rounds_ms": t, "repeats": repeats * rounds} for t in per_round]
