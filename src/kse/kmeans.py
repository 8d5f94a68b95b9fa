"""Batched k-means for KSE kernel clustering (KSE Sec. 3.4).

Clusters many small point sets at once: ``points: Tensor[B, N, D]`` holds B input channels,
each with N flattened kernels of length D = kh * kw, and every set gets the same number of
centroids q (KSE groups channels by q, so one call per centroid-count bucket). k-means++
initialisation (Arthur & Vassilvitskii 2007) then Lloyd iterations, all on tensors;
deterministic for a given ``torch.Generator`` seed, on CPU and CUDA.

NOTE: the official code runs sklearn ``KMeans(n_init=10)`` channel by channel without a seed
(not reproducible, minutes per ResNet-50). We keep the best of ``n_init`` seeded runs by
inertia, batched over channels.

:func:`cluster_kernels` (one layer) and :func:`cluster_many` (several layers sharing batched
calls) apply it to a convolution weight ``Tensor[N, C, kh, kw]``: channel c gets ``counts[c]``
centroids (KSE Eq. for q_c, Sec. 3.4); all centroids of a layer are stored channel after
channel in one table, whose first row per channel is :func:`centroid_offsets`.

Example::

    >>> import torch
    >>> from kse.kmeans import batched_kmeans
    >>> pts = torch.randn(8, 64, 9)
    >>> centroids, assign = batched_kmeans(pts, 4, generator=torch.Generator().manual_seed(0))
    >>> centroids.shape, assign.shape
    (torch.Size([8, 4, 9]), torch.Size([8, 64]))
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

_CHUNK_ELEMS = 2**20  # distance-matrix elements per chunk of point sets (4 MiB of float32: cache-sized)


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
    first, uniforms = draw_seeds(points.shape[0], points.shape[1], q, 1, generator)
    return _seed(points, first[0], uniforms[0])


def draw_seeds(B: int, N: int, q: int, n_init: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """The random numbers of ``n_init`` k-means++ seedings of B sets, drawn up front on the CPU
    generator (the same picks on CPU and CUDA, whatever the batching): ``first: [n_init, B]``
    (index of the first centroid) and ``uniforms: [n_init, B, q]`` (inverse-CDF draws)."""
    first, uniforms = [], []
    for _ in range(n_init):
        first.append(torch.randint(N, (B,), generator=generator))
        uniforms.append(torch.rand(B, q, generator=generator))
    return torch.stack(first), torch.stack(uniforms)


_BLOCK = 32  # points per block of the two-level inverse-CDF draw


def _seed(points: Tensor, first: Tensor, uniforms: Tensor) -> Tensor:
    """k-means++ with given draws (see ``draw_seeds``): ``first: [B]``, ``uniforms: [B, q]``.

    Each draw inverts the CDF of the squared distances in two levels: a cumulative sum over
    block sums picks the block, one over the block's 32 values picks the point. This is the
    same draw as one cumulative sum over all N points (up to rounding), but a cumulative sum
    runs serially along its row, a block sum does not."""
    B, N, D = points.shape
    q = uniforms.shape[1]
    first = first.to(points.device)
    uniforms = uniforms.to(points.device, points.dtype)
    nb = -(-N // _BLOCK)
    rows = torch.arange(B, device=points.device).unsqueeze(1)
    centroids = points.new_empty(B, q, D)
    centroids[:, 0] = points[rows.squeeze(1), first]
    # squared distance to the nearest seed, padded to whole blocks with zeros (never drawn)
    closest = points.new_zeros(B, nb * _BLOCK)
    dist = closest[:, :N]
    torch.sum((points - centroids[:, :1]).pow_(2), -1, out=dist)
    blocks = closest.view(B, nb, _BLOCK)
    flat = points.squeeze(-1) if D == 1 else None  # scalar points: plain [B, N] arithmetic, no reduction
    for j in range(1, q):
        block_cdf = blocks.sum(-1).cumsum_(-1)  # [B, nb]
        target = uniforms[:, j:j + 1] * block_cdf[:, -1:]
        # inverse-CDF draw; where every distance is 0 (only duplicates left) any point will do
        b = torch.searchsorted(block_cdf, target, right=True).clamp_(max=nb - 1)  # [B, 1]
        below = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp_(min=0)), torch.zeros_like(target))
        inner = blocks.gather(1, b.unsqueeze(-1).expand(B, 1, _BLOCK)).squeeze(1).cumsum_(-1)  # [B, BLOCK]
        pick = (b * _BLOCK + torch.searchsorted(inner, target - below, right=True).clamp_(max=_BLOCK - 1))
        pick.clamp_(max=N - 1)
        if flat is not None:
            chosen = flat.gather(1, pick)  # [B, 1]
            centroids[:, j, 0] = chosen.squeeze(1)
            torch.minimum(dist, (flat - chosen).square_(), out=dist)
        else:
            chosen = points.gather(1, pick.unsqueeze(-1).expand(B, 1, D))  # [B, 1, D]
            centroids[:, j] = chosen.squeeze(1)
            torch.minimum(dist, (points - chosen).pow_(2).sum(-1), out=dist)
    return centroids


def _drop_converged(moving: Tensor, idx: Tensor, store: Tensor, cents: Tensor, *rest: Tensor):
    """One compaction step of the Lloyd loops: ``None`` when no set of the working batch moved
    (all converged); else the working batch ``(idx, cents, *rest)``, reduced to the sets that
    moved once a quarter of it has converged (their centroids written back to ``store`` first)."""
    n_moving = int(moving.sum())
    if n_moving == 0:
        return None
    if n_moving > 0.75 * len(idx):
        return (idx, cents, *rest)
    store[idx] = cents
    return (idx[moving], cents[moving], *(t[moving] for t in rest))


def _lloyd(points: Tensor, centroids: Tensor, iters: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Lloyd iterations until no assignment changes (or ``iters``); per set, so a set that has
    converged leaves the working batch once a quarter of it has (a converged set is at a fixed
    point: further iterations would not change it)."""
    B, N, D = points.shape
    q = centroids.shape[1]
    centroids = centroids.clone()
    idx = torch.arange(B, device=points.device)  # sets still in the working batch
    pts, cents, prev = points, centroids, None
    for _ in range(iters):
        assign = _nearest(pts, cents)  # [b, N]
        if prev is not None:
            working = _drop_converged((assign != prev).any(1), idx, centroids, cents, pts, assign)
            if working is None:
                break
            idx, cents, pts, assign = working
        prev = assign
        b = len(idx)
        sums = pts.new_zeros(b, q, D).scatter_add_(1, assign.unsqueeze(-1).expand(b, N, D), pts)
        counts = pts.new_zeros(b, q).scatter_add_(1, assign, pts.new_ones(b, N))
        # an empty cluster keeps its previous centroid
        cents = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), cents)
    centroids[idx] = cents
    assign = _nearest(points, centroids)
    inertia = (points - centroids.gather(1, assign.unsqueeze(-1).expand(B, N, D))).pow(2).sum((1, 2))
    return centroids, assign, inertia


def _lloyd_1d(points: Tensor, centroids: Tensor, iters: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Lloyd's algorithm for scalar points (1x1 kernels), exact and O(N log q) per iteration:
    with the points sorted, each cluster is a contiguous run bounded by centroid midpoints,
    and its sum comes from a prefix sum. Converged sets leave the working batch as in ``_lloyd``."""
    B, N, _ = points.shape
    xs_all, order = points.squeeze(-1).sort(-1)
    # [B, N + 1], in float64: a run's sum is a difference of two prefix sums, which in float32
    # loses the low bits of the run to the larger prefix (centroids off their members' mean)
    prefix_all = torch.nn.functional.pad(xs_all.to(torch.float64).cumsum(-1), (1, 0))
    cents_all = centroids.squeeze(-1).sort(-1).values
    idx = torch.arange(B, device=points.device)
    xs, prefix, cents, bounds = xs_all, prefix_all, cents_all, None
    for _ in range(iters):
        mids = (cents[:, 1:] + cents[:, :-1]) / 2
        new_bounds = torch.searchsorted(xs, mids)  # [b, q - 1]: first point of each next cluster
        if bounds is not None:
            working = _drop_converged((new_bounds != bounds).any(1), idx, cents_all, cents, xs, prefix, new_bounds)
            if working is None:
                break
            idx, cents, xs, prefix, new_bounds = working
        bounds = new_bounds
        starts = torch.nn.functional.pad(bounds, (1, 0), value=0)
        ends = torch.nn.functional.pad(bounds, (0, 1), value=N)
        counts = (ends - starts).to(prefix.dtype)
        sums = prefix.gather(1, ends) - prefix.gather(1, starts)
        cents = torch.where(counts > 0, (sums / counts.clamp_min(1)).to(xs.dtype), cents)  # empty: keep
        if (counts == 0).any():  # without empty clusters the means of consecutive runs are already sorted
            cents = cents.sort(-1).values
    cents_all[idx] = cents
    xs, cents = xs_all, cents_all
    mids = (cents[:, 1:] + cents[:, :-1]) / 2
    bounds = torch.searchsorted(xs, mids)
    rank = torch.arange(N, device=xs.device).expand(B, N).contiguous()
    sorted_assign = torch.searchsorted(bounds, rank, right=True)  # cluster of each sorted point
    assign = torch.empty_like(sorted_assign).scatter_(1, order, sorted_assign)
    inertia = (xs - cents.gather(1, sorted_assign)).pow(2).sum(-1)
    return cents.unsqueeze(-1), assign, inertia


def batched_kmeans(points: Tensor, q: int, iters: int = 50, n_init: int = 1,
                   generator: Optional[torch.Generator] = None,
                   seeds: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """k-means with ``q`` centroids on each of B point sets.

    Args:
        points: ``Tensor[B, N, D]``.
        q: centroids per set, ``1 <= q <= N``.
        iters: maximum Lloyd iterations (stops early when no assignment changes).
        n_init: seeded restarts; the run with the lowest inertia is kept, per set.
        generator: a CPU ``torch.Generator`` (default: seed 0).
        seeds: the draws of ``draw_seeds(B, N, q, n_init, ...)`` to use instead of drawing from
            ``generator``. Each set's result depends only on its points and its draws, so sets
            of several layers can be clustered in one call and give what they give alone.
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
    if q == N:  # every kernel its own centroid
        return points.clone(), torch.arange(N, device=points.device).expand(B, N).clone()
    if q == 1:
        return points.mean(1, keepdim=True), torch.zeros(B, N, dtype=torch.long, device=points.device)
    if seeds is None:
        seeds = draw_seeds(B, N, q, n_init, generator if generator is not None else torch.Generator().manual_seed(0))
    first, uniforms = seeds
    if first.shape != (n_init, B) or uniforms.shape != (n_init, B, q):
        raise ValueError(f"seeds must be shaped ({n_init}, {B}) and ({n_init}, {B}, {q}) (see draw_seeds), got "
                         f"{tuple(first.shape)} and {tuple(uniforms.shape)}")
    lloyd = _lloyd_1d if D == 1 else _lloyd
    # k-means++ needs O(B N D) memory: all sets at once (its q steps are sequential, so fewer,
    # larger steps); Lloyd on D > 1 needs a [B, N, q] distance matrix: chunks of sets
    inits = [_seed(points, first[r], uniforms[r]) for r in range(n_init)]
    step = B if D == 1 else max(1, _CHUNK_ELEMS // (N * q))
    all_c, all_a = [], []
    for lo in range(0, B, step):
        chunk = points[lo:lo + step]
        best_c = best_a = best_i = None
        for r in range(n_init):
            c, a, inertia = lloyd(chunk, inits[r][lo:lo + step], iters)
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


# ----------------------------------------------------------------------------- kernels of a layer
def centroid_offsets(counts: Tensor) -> Tensor:
    """First centroid row of each kept channel: the exclusive prefix sum of ``counts``."""
    offsets = torch.zeros_like(counts)
    if len(counts) > 1:
        offsets[1:] = counts.cumsum(0)[:-1]
    return offsets


def cluster_kernels(weight: Tensor, counts: Tensor, generator: Optional[torch.Generator] = None,
                    iters: int = 50, n_init: int = 1):
    """k-means the N kernels of every input channel into ``counts[c]`` centroids.

    Channels are processed in batches of equal count (one batched k-means per distinct q).

    Args:
        weight: ``Tensor[N, C, kh, kw]``.
        counts: ``LongTensor[C]``, each in ``[0, N]`` (0: channel dropped).
    Returns:
        ``(kept: LongTensor[K], centroids: Tensor[M, kh, kw], assignment: LongTensor[K, N])``
        with K the channels whose count is > 0, in increasing order, and
        ``assignment[j, n]`` the centroid row of kernel n of kept channel ``kept[j]``.
    """
    return cluster_many([(weight, counts, generator)], iters, n_init)[0]


def cluster_many(jobs: Sequence[Tuple[Tensor, Tensor, Optional[torch.Generator]]], iters: int = 50, n_init: int = 1,
                 map_fn: Callable = map) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """``cluster_kernels`` for several layers at once: ``jobs`` holds ``(weight, counts, generator)``.

    Channel sets of equal shape and centroid count are clustered in one batched k-means across
    layers (the per-call overhead dominates for small buckets), while each layer draws its
    k-means++ numbers from its own generator: a layer's result is the same as alone.
    ``map_fn`` runs the batched calls (e.g. a thread pool's ``map``).
    """
    layers, groups = [], {}
    for j, (weight, counts, generator) in enumerate(jobs):
        N, C, kh, kw = weight.shape
        counts = torch.as_tensor(counts).to(torch.long).cpu()
        if counts.shape != (C,) or (counts < 0).any() or (counts > N).any():
            lo, hi = (int(counts.min()), int(counts.max())) if counts.numel() else (0, 0)
            raise ValueError(f"centroid counts must be LongTensor[{C}] with values in [0, {N}], got shape "
                             f"{tuple(counts.shape)} with values in [{lo}, {hi}]")
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        kept = torch.nonzero(counts > 0).flatten()
        kernels = weight.detach().reshape(N, C, kh * kw).transpose(0, 1)  # [C, N, D]
        kept_counts = counts[kept]
        work_dtype = torch.promote_types(weight.dtype, torch.float32)
        layers.append((weight, kept, kept_counts))
        for q in torch.unique(kept_counts).tolist():
            pos = torch.nonzero(kept_counts == q).flatten()  # positions in `kept`
            points = kernels[kept[pos].to(weight.device)].to(work_dtype)
            seeds = draw_seeds(len(pos), N, q, n_init, generator) if 1 < q < N else None
            key = (N, kh * kw, q, work_dtype, str(weight.device))
            groups.setdefault(key, []).append((j, pos, points, seeds))

    def run(key):
        members = groups[key]
        q = key[2]
        points = torch.cat([m[2] for m in members])
        seeds = None
        if members[0][3] is not None:
            seeds = (torch.cat([m[3][0] for m in members], 1), torch.cat([m[3][1] for m in members], 1))
        return batched_kmeans(points, q, iters=iters, n_init=n_init, seeds=seeds)

    # largest first, so that parallel workers finish together
    keys = sorted(groups, key=lambda k: -k[0] * k[1] * k[2] * sum(len(m[1]) for m in groups[k]))
    results = [(weight.new_empty(int(kc.sum()), weight.shape[2] * weight.shape[3]),
                torch.empty(len(kept), weight.shape[0], dtype=torch.long)) for weight, kept, kc in layers]
    offsets = [centroid_offsets(kc) for _, _, kc in layers]  # centroid rows: channel after channel, in kept order
    for key, (cents, assign) in zip(keys, map_fn(run, keys)):
        q, start = key[2], 0
        for j, pos, _, _ in groups[key]:
            part = slice(start, start + len(pos))
            start += len(pos)
            centroids, assignment = results[j]
            rows = offsets[j][pos].unsqueeze(1) + torch.arange(q)  # [P, q]
            centroids[rows.flatten().to(centroids.device)] = cents[part].reshape(-1, key[1]).to(centroids.dtype)
            assignment[pos] = assign[part].cpu() + offsets[j][pos].unsqueeze(1)
    return [(kept, centroids.reshape(len(centroids), *weight.shape[2:]), assignment)
            for (weight, kept, _), (centroids, assignment) in zip(layers, results)]
