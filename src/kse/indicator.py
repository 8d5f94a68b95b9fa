"""The KSE indicator: kernel sparsity, kernel entropy and the centroid-count rule.

Li et al., "Exploiting Kernel Sparsity and Entropy for Interpretable CNN Compression",
CVPR 2019, Sec. 3.1-3.3 (Eqs. 4-8). All functions are pure and batched: every input channel
of a layer is scored at once, no Python loop over channels.

A conv weight ``W: Tensor[N, C, kh, kw]`` has N output and C input channels. KSE judges each
*input* channel ``c`` by the N 2D kernels ``W[:, c]`` that read it.

Example::

    >>> import torch, kse
    >>> w = torch.randn(64, 32, 3, 3)
    >>> v = kse.kse_indicator(w)              # Tensor[32], in [0, 1]
    >>> q = kse.centroid_counts(v, 64, G=4)   # LongTensor[32]: 0 (pruned) .. 64 (kept whole)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Bytes of distance matrix allowed per chunk of channels: bounds peak memory, and small enough
# that top-k reads the scores from cache right after the Gram product wrote them
# (benchmarks/compress_speed.py measures the whole indicator)
_CHUNK_BYTES = 4 * 2**20


def _check_weight(weight: Tensor, name: str = "weight") -> None:
    if not torch.is_tensor(weight):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.ndim != 4:
        raise ValueError(f"{name} must be a conv weight Tensor[N, C, kh, kw], got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(weight.shape)})")
    if weight.is_meta:
        raise ValueError(f"{name} is on the meta device (a shape without values); load or initialise the weights first")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name} holds NaN or Inf values; KSE needs finite weights (check the checkpoint)")


def kernel_sparsity(weight: Tensor) -> Tensor:
    """Kernel sparsity of every input channel (KSE Eq. 4).

        s_c = sum_n || W[n, c] ||_1

    Args:
        weight: ``Tensor[N, C, kh, kw]``.
    Returns:
        ``Tensor[C]`` (float, on ``weight``'s device).
    """
    _check_weight(weight)
    return weight.detach().double().abs().sum(dim=(0, 2, 3)).to(_result_dtype(weight))


def _nearest_distance_sums(kernels: Tensor, k: int) -> Tensor:
    """``dm[c, n]``: sum of Euclidean distances from kernel n to its k nearest neighbours
    among the other kernels of the same channel. ``kernels: Tensor[C, N, D]`` (float64)."""
    if kernels.shape[-1] == 1:
        return _nearest_distance_sums_1d(kernels.squeeze(-1), k)
    C, N, D = kernels.shape
    out = kernels.new_empty(C, N)
    step = max(1, _CHUNK_BYTES // max(1, N * N * kernels.element_size()))
    for lo in range(0, C, step):
        chunk = kernels[lo:lo + step]
        # candidates by the fast Gram-matrix distances, then exact distances for the k chosen
        # (so that duplicate kernels are exactly 0 apart)
        # centred per channel (distances do not change) so the float32 Gram trick keeps its precision
        fast = (chunk - chunk.mean(1, keepdim=True)).float()
        sq = fast.pow(2).sum(-1)
        # ||x_i||^2 is the same along row i: it does not change which j are nearest, so leave it out
        # (one pass over the [c, N, N] scores less)
        approx = torch.baddbmm(sq.unsqueeze(1), fast, fast.transpose(1, 2), alpha=-2)
        approx.diagonal(dim1=1, dim2=2).fill_(float("inf"))  # not its own neighbour
        idx = approx.topk(k, dim=-1, largest=False).indices  # [c, N, k]
        neighbours = chunk.gather(1, idx.reshape(len(chunk), N * k, 1).expand(-1, -1, D)).view(len(chunk), N, k, D)
        out[lo:lo + step] = (neighbours - chunk.unsqueeze(2)).norm(dim=-1).sum(-1)
    return out


_CACHE_ELEMS = 2**15  # float64 elements per chunk of element-wise work (256 KiB)


def _nearest_distance_sums_1d(values: Tensor, k: int) -> Tensor:
    """1x1 kernels: the k nearest neighbours of a scalar lie among the k values on either
    side of it in sorted order (exact). With ``L_1 <= .. <= L_k`` the distances to the left
    neighbours and ``R_1 <= .. <= R_k`` to the right ones, the sum of the k smallest of both
    lists is ``min_t (L_1 + .. + L_t) + (R_1 + .. + R_{k-t})``: prefix sums, no sort or top-k."""
    C, N = values.shape
    sorted_all, order = values.sort(dim=-1)
    dm_all = torch.empty_like(sorted_all)
    step = max(1, _CACHE_ELEMS // (N + 2 * k))  # rows per chunk: the ~30 passes below stay in cache
    for lo in range(0, C, step):
        sorted_vals = sorted_all[lo:lo + step]
        pad = torch.full((len(sorted_vals), k), float("inf"), dtype=values.dtype, device=values.device)
        padded = torch.cat([-pad, sorted_vals, pad], dim=1)  # distances past the ends are inf
        # plain [c, N] tensors: element-wise ops vectorise, reductions over a dim of k+1 do not
        prefix_l, prefix_r = [torch.zeros_like(sorted_vals)], [torch.zeros_like(sorted_vals)]  # j nearest, j=0..k
        for j in range(1, k + 1):
            prefix_l.append(prefix_l[-1] + (sorted_vals - padded[:, k - j:k - j + N]))
            prefix_r.append(prefix_r[-1] + (padded[:, k + j:k + j + N] - sorted_vals))
        dm = dm_all[lo:lo + step]
        torch.add(prefix_l[0], prefix_r[k], out=dm)  # t = 0 from the left, k from the right; then the rest
        for t in range(1, k + 1):
            torch.minimum(dm, prefix_l[t] + prefix_r[k - t], out=dm)
    return torch.empty_like(dm_all).scatter_(1, order, dm_all)


def kernel_entropy(weight: Tensor, k: int = 5) -> Tensor:
    """Kernel (density) entropy of every input channel (KSE Eqs. 5-6).

    For channel c, flatten its N kernels ``W[:, c]`` to vectors and, for each kernel n,
    sum the distances to its k nearest neighbours among the other N - 1 kernels:

        dm(n) = sum_{j in kNN(n)} || W[n, c] - W[j, c] ||_2
        p(n)  = dm(n) / sum_n' dm(n')
        e_c   = - sum_n p(n) log2 p(n)

    NOTE: the authors' code computes this over the wrong kernels (it reshapes an array
    already transposed to (C, N, D), see ``official_layout_entropy``); we follow the paper.
    Edge cases the official code crashes on: ``N <= k`` uses ``k = N - 1``; ``N = 1`` gives
    0; a ``dm`` of 0 contributes ``0 log 0 = 0``; when every ``dm`` is 0 (all kernels equal)
    the distribution is taken as uniform, ``e_c = log2 N``.

    Args:
        weight: ``Tensor[N, C, kh, kw]``.
        k: number of nearest neighbours (the official code uses 5).
    Returns:
        ``Tensor[C]``, each value in ``[0, log2 N]``.
    """
    _check_weight(weight)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    N, C = weight.shape[:2]
    if N == 1:
        return torch.zeros(C, dtype=_result_dtype(weight), device=weight.device)
    kernels = weight.detach().double().reshape(N, C, -1).transpose(0, 1)  # [C, N, D]
    dm = _nearest_distance_sums(kernels, min(k, N - 1))
    return _entropy_of(dm).to(_result_dtype(weight))


def _result_dtype(weight: Tensor) -> torch.dtype:
    # half / bfloat16 weights get float32 scores: rounding them would move bucket edges
    return torch.promote_types(weight.dtype, torch.float32)


def _entropy_of(dm: Tensor) -> Tensor:
    """Entropy (bits) of each row of ``dm: Tensor[C, N] >= 0`` normalised to sum 1;
    an all-zero row counts as uniform."""
    total = dm.sum(-1, keepdim=True)
    N = dm.shape[-1]
    p = torch.where(total > 0, dm / total.clamp_min(torch.finfo(dm.dtype).tiny), torch.full_like(dm, 1.0 / N))
    plogp = torch.where(p > 0, p * torch.log2(p.clamp_min(torch.finfo(p.dtype).tiny)), torch.zeros_like(p))
    return -plogp.sum(-1)


def official_layout_entropy(weight: Tensor, k: int = 5) -> Tensor:
    """The entropy as the authors' code computes it, kept only for the ablation.

    Their ``Conv2d_KSE.KSE()`` transposes the weight to ``(C, N, D)`` and then calls
    ``reshape(N, C, -1)`` on it: a reshape is not a transpose, so "channel c" is scored on
    the wrong kernels (for a square layer, the C kernels of output filter c). Reproduced here
    so that the difference can be measured (``kse`` never uses it for compression).

    Returns ``Tensor[C]``.
    """
    _check_weight(weight)
    N, C = weight.shape[:2]
    transposed = weight.detach().double().reshape(N, C, -1).transpose(0, 1).contiguous()  # (C, N, D)
    scrambled = transposed.reshape(N, C, -1)  # the official code's reshape of a (C, N, D) array
    # the official code then treats scrambled[:, c] as the N kernels of channel c
    if N == 1:
        return torch.zeros(C, dtype=_result_dtype(weight), device=weight.device)
    dm = _nearest_distance_sums(scrambled.transpose(0, 1), min(k, N - 1))
    return _entropy_of(dm).to(_result_dtype(weight))


def minmax_normalize(values: Tensor) -> Tensor:
    """``(x - min) / (max - min)``; when all values are equal (max == min) every value is 1.

    NOTE: the official code divides by zero there and returns NaN.
    """
    lo, hi = values.min(), values.max()
    if hi - lo <= 0:
        return torch.ones_like(values)
    return (values - lo) / (hi - lo)


def kse_indicator(weight: Tensor, alpha: float = 1.0, k: int = 5) -> Tensor:
    """The KSE indicator of every input channel (KSE Eq. 7), in ``[0, 1]``.

        v_c = sqrt( s_c / (1 + alpha * e_c) ),  s and e min-max normalised in the layer,

    then ``v`` itself is min-max normalised in the layer (as in the official code, where
    alpha = 1). Large ``v``: a channel that matters (dense, hard-to-cluster kernels).

    Args:
        weight: ``Tensor[N, C, kh, kw]``.
        alpha: weight of the entropy term (>= 0; 0 scores by sparsity alone).
        k: nearest neighbours for the entropy.
    Returns:
        ``Tensor[C]`` in ``[0, 1]`` (float64 math, returned in ``weight``'s dtype).
    """
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return _indicator64(weight, alpha, k).to(_result_dtype(weight))


def _indicator64(weight: Tensor, alpha: float, k: int, score: str = "kse", entropy_layout: str = "paper") -> Tensor:
    """The indicator in float64 (used for bucketing, where edges must be exact).

    ``score`` and ``entropy_layout`` select the ablation variants of ``KSEConfig``:
    ``"sparsity"`` is Eq. 7 with alpha = 0; ``"entropy"`` drops the sparsity,
    ``v = sqrt(1 / (1 + e))``; ``entropy_layout="official"`` scores the entropy the way the
    authors' code does (``official_layout_entropy``)."""
    weight64 = weight.detach().double()
    if score == "sparsity":
        alpha = 0.0
    s = (minmax_normalize(kernel_sparsity(weight64)) if score != "entropy"
         else torch.ones(weight64.shape[1], dtype=torch.float64, device=weight64.device))
    if alpha == 0:
        e = torch.zeros_like(s)  # unused by Eq. 7: skip the kNN
    else:
        entropy = official_layout_entropy if entropy_layout == "official" else kernel_entropy
        e = minmax_normalize(entropy(weight64, k).double())
    return indicator_from_scores(s, e, alpha)


def indicator_from_scores(s: Tensor, e: Tensor, alpha: float = 1.0) -> Tensor:
    """Combine already min-max normalised sparsity ``s`` and entropy ``e`` (Eq. 7), normalised."""
    return minmax_normalize(torch.sqrt(s / (1 + alpha * e)))


def centroid_counts(indicator: Tensor, out_channels: int, G: int = 4, T: int = 0) -> Tensor:
    """Number of centroids ``q_c`` for each input channel (KSE Eq. 8).

        floor(v G) == 0   -> q_c = 0                      (input channel pruned)
        ceil(v G)  == G   -> q_c = N                      (all N kernels kept)
        otherwise          q_c = ceil(N * 2^(g + 1 - T - G)),  g = floor(v G)

    (q is capped at N.) With G=4, T=0: v < .25 pruned, [.25, .5) N/4, [.5, .75) N/2,
    >= .75 N. The products ``v G`` are taken in float64 so bucket edges are exact; the counts
    in integers, ``ceil(N / 2^s)`` with ``s = T + G - g - 1 >= 0``, so that a large ``T`` or
    ``G`` gives one centroid (never 0, as ``2^-s`` underflowing in float64 would).

    Args:
        indicator: ``Tensor[C]`` in ``[0, 1]``.
        out_channels: N, the number of kernels per input channel.
        G: number of groups (integer in ``[2, MAX_GROUPS]``).  T: shift (integer in
            ``[0, MAX_SHIFT]``; from ``log2 N`` on, every kept channel gets one centroid).
    Returns:
        ``LongTensor[C]`` with values in ``[0, N]``.
    """
    check_groups_and_shift(G, T)
    if not isinstance(out_channels, int) or isinstance(out_channels, bool) or not 1 <= out_channels < 2**62:
        raise ValueError(f"out_channels must be an integer >= 1, got {out_channels!r}")
    v = indicator.detach().double().cpu()
    if v.ndim != 1 or not torch.isfinite(v).all() or (v < 0).any() or (v > 1).any():
        lo, hi = (float(v.min()), float(v.max())) if v.numel() else (float("nan"), float("nan"))
        raise ValueError(f"indicator must be a 1-D tensor of finite values in [0, 1], got shape "
                         f"{tuple(v.shape)} with values in [{lo:.4g}, {hi:.4g}]")
    vG = v * G
    g = torch.floor(vG).long()
    # q = ceil(N / 2^s); from s = bit_length(N) on it is 1, so the shift is capped there (no overflow)
    shift = (T + G - 1 - g).clamp(min=0, max=out_channels.bit_length())
    q = ((out_channels + (1 << shift) - 1) >> shift).clamp(max=out_channels)
    q = torch.where(g == 0, torch.zeros_like(q), q)
    q = torch.where(torch.ceil(vG) == G, torch.full_like(q, out_channels), q)
    return q.to(indicator.device)


MAX_GROUPS = 2**20  # G: buckets of v in [0, 1]; v * G stays exact in float64
MAX_SHIFT = 2**20  # T: beyond log2 N (at most 62) every kept channel already gets one centroid


def check_groups_and_shift(G: int, T: int) -> None:
    """``G`` an integer in ``[2, MAX_GROUPS]`` and ``T`` one in ``[0, MAX_SHIFT]``, else ``ValueError``."""
    for name, value, low, high in (("G", G, 2, MAX_GROUPS), ("T", T, 0, MAX_SHIFT)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if value > high:
            raise ValueError(f"{name} must be an integer <= {high}, got {value!r}")
