"""Wall-clock timing of a call, synchronising CUDA when the input lives there."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict

import torch
from torch import Tensor


def time_call(fn: Callable[[Tensor], Any], x: Tensor, warmup: int = 3, repeats: int = 20) -> Dict[str, float]:
    """Median / min wall time of ``fn(x)`` in milliseconds, after ``warmup`` calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(warmup):
        fn(x)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats}
