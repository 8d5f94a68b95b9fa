"""Batched k-means for KSE kernel clustering (KSE Sec. 3.4).

Clusters many small point sets at once: ``points: Tensor[B, N, D]`` holds B input channels,
each with N flattened kernels of length D = kh * kw, and every set gets the same number of
centroids q (KSE groups channels by q, so one call per centroid-count bucket). k-means++
initialisation (Arthur & Vassilvitskii 2007) then Lloyd iterations, all on tensors;
deterministic for a given ``torch.Generator`` seed, on CPU and CUDA.

NOTE: the official code runs sklearn ``KMeans(n_init=10)`` channel by channel without a seed
(not reproducible, minutes per ResNet-50). We keep the best of ``n_init`` seeded runs by
inertia, batched over channels.

Example::

    >>> import torch
    >>> from kse.kmeans import batched_kmeans
    >>> pts = torch.randn(8, 64, 9)
    >>> centroids, assign = batched_kmeans(pts, 4, generator=torch.Generator().manual_seed(0))
    >>> centroids.shape, assign.shape
    (torch.Size([8, 4, 9]), torch.Size([8, 64]))
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_CHUNK_ELEMS = 16 * 2**20  # distance-matrix elements per chunk of point sets


def _nearest(points: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid, ``LongTensor[B, N]``.

    Uses ``argmin_j ||c_j||^2 - 2 x.c_j`` (the ``||x||^2`` term does not change the argmin)."""
    scores = torch.baddbmm(centroids.pow(2).sum(-1).unsqueeze(1), points, centroids.transpose(1, 2), alpha=-2)
    return scores.argmin(-1)


def kmeans_plusplus(points: Tensor, q: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding for every set: ``Tensor[B, N, D] -> Tensor[B, q, D]``.

    First centroid uniform, each next one drawn with probability proportional to the squared
    distance to the nearest centroid chosen so far (uniform where all distances are 0).
    """
    B, N, D = points.shape
    first = torch.randint(N, (B,), generator=generator).to(points.device)
    # uniforms drawn up front on the CPU generator: the same picks on CPU and CUDA
    uniforms = torch.rand(B, q, generator=generator).to(points.device, points.dtype)
    centroids = points.new_empty(B, q, D)
    centroids[:, 0] = points[torch.arange(B, device=points.device), first]
    closest = (points - centroids[:, :1]).pow_(2).sum(-1)  # [B, N] squared distance to the nearest seed
    flat = points.squeeze(-1) if D == 1 else None  # scalar points: plain [B, N] arithmetic, no reduction
    for j in range(1, q):
        cdf = closest.cumsum(-1)
        # inverse-CDF draw; where every distance is 0 (only duplicates left) any point will do
        pick = torch.searchsorted(cdf, uniforms[:, j:j + 1] * cdf[:, -1:], right=True).clamp_(max=N - 1)
        if flat is not None:
            chosen = flat.gather(1, pick)  # [B, 1]
            centroids[:, j, 0] = chosen.squeeze(1)
            torch.minimum(closest, (flat - chosen).square_(), out=closest)
        else:
            chosen = points.gather(1, pick.unsqueeze(-1).expand(B, 1, D))  # [B, 1, D]
            centroids[:, j] = chosen.squeeze(1)
            torch.minimum(closest, (points - chosen).pow_(2).sum(-1), out=closest)
    return centroids


def _lloyd(points: Tensor, centroids: Tensor, iters: int) -> Tuple[Tensor, Tensor, Tensor]:
    B, N, D = points.shape
    q = centroids.shape[1]
    assign = None
    for _ in range(iters):
        new_assign = _nearest(points, centroids)  # [B, N]
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = points.new_zeros(B, q, D).scatter_add_(1, assign.unsqueeze(-1).expand(B, N, D), points)
        counts = points.new_zeros(B, q).scatter_add_(1, assign, points.new_ones(B, N))
        # an empty cluster keeps its previous centroid
        centroids = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), centroids)
    assign = _nearest(points, centroids)
    inertia = (points - centroids.gather(1, assign.unsqueeze(-1).expand(B, N, D))).pow(2).sum((1, 2))
    return centroids, assign, inertia


def _lloyd_1d(points: Tensor, centroids: Tensor, iters: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Lloyd's algorithm for scalar points (1x1 kernels), exact and O(N log q) per iteration:
    with the points sorted, each cluster is a contiguous run bounded by centroid midpoints,
    and its sum comes from a prefix sum."""
    B, N, _ = points.shape
    xs, order = points.squeeze(-1).sort(-1)
    prefix = torch.nn.functional.pad(xs.cumsum(-1), (1, 0))  # [B, N + 1]
    cents = centroids.squeeze(-1).sort(-1).values
    bounds = None
    for _ in range(iters):
        mids = (cents[:, 1:] + cents[:, :-1]) / 2
        new_bounds = torch.searchsorted(xs, mids)  # [B, q - 1]: first point of each next cluster
        if bounds is not None and torch.equal(new_bounds, bounds):
            break
        bounds = new_bounds
        starts = torch.nn.functional.pad(bounds, (1, 0), value=0)
        ends = torch.nn.functional.pad(bounds, (0, 1), value=N)
        counts = (ends - starts).to(xs.dtype)
        sums = prefix.gather(1, ends) - prefix.gather(1, starts)
        cents = torch.where(counts > 0, sums / counts.clamp_min(1), cents)  # empty: keep
        cents = cents.sort(-1).values
    mids = (cents[:, 1:] + cents[:, :-1]) / 2
    bounds = torch.searchsorted(xs, mids)
    rank = torch.arange(N, device=xs.device).expand(B, N).contiguous()
    sorted_assign = torch.searchsorted(bounds, rank, right=True)  # cluster of each sorted point
    assign = torch.empty_like(sorted_assign).scatter_(1, order, sorted_assign)
    inertia = (xs - cents.gather(1, sorted_assign)).pow(2).sum(-1)
    return cents.unsqueeze(-1), assign, inertia


def batched_kmeans(points: Tensor, q: int, iters: int = 50, n_init: int = 1,
                   generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """k-means with ``q`` centroids on each of B point sets.

    Args:
        points: ``Tensor[B, N, D]``.
        q: centroids per set, ``1 <= q <= N``.
        iters: maximum Lloyd iterations (stops early when no assignment changes).
        n_init: seeded restarts; the run with the lowest inertia is kept, per set.
        generator: a CPU ``torch.Generator`` (default: seed 0).
    Returns:
        ``(centroids: Tensor[B, q, D], assignment: LongTensor[B, N])``: each point goes to its
        nearest centroid; once Lloyd has converged (it stops early when no assignment
        changes) each centroid is also the mean of its points.
    """
    if points.ndim != 3:
        raise ValueError(f"points must be Tensor[B, N, D], got shape {tuple(points.shape)}")
    B, N, D = points.shape
    if not isinstance(q, int) or not 1 <= q <= N:
        raise ValueError(f"q must be an integer in [1, {N}], got {q!r}")
    if not isinstance(iters, int) or iters < 1 or not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"iters and n_init must be integers >= 1, got iters={iters!r}, n_init={n_init!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if q == N:  # every kernel its own centroid
        return points.clone(), torch.arange(N, device=points.device).expand(B, N).clone()
    if q == 1:
        return points.mean(1, keepdim=True), torch.zeros(B, N, dtype=torch.long, device=points.device)
    step = max(1, _CHUNK_ELEMS // (N * q))
    all_c, all_a = [], []
    for lo in range(0, B, step):
        chunk = points[lo:lo + step]
        best_c = best_a = best_i = None
        for _ in range(n_init):
            lloyd = _lloyd_1d if D == 1 else _lloyd
            c, a, inertia = lloyd(chunk, kmeans_plusplus(chunk, q, generator), iters)
            if best_i is None:
                best_c, best_a, best_i = c, a, inertia
            else:
                better = inertia < best_i
                best_c = torch.where(better[:, None, None], c, best_c)
                best_a = torch.where(better[:, None], a, best_a)
                best_i = torch.minimum(inertia, best_i)
        all_c.append(best_c)
        all_a.append(best_a)
    return torch.cat(all_c), torch.cat(all_a)
