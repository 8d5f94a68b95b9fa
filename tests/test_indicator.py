"""Known-answer and property tests for kse.indicator (KSE Eqs. 4-8)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kse
from kse.indicator import minmax_normalize, official_layout_entropy


def test_sparsity_known_answer():
    w = torch.zeros(2, 3, 1, 2)
    w[0, 0] = torch.tensor([[1.0, -2.0]])
    w[1, 0] = torch.tensor([[0.5, 0.0]])
    w[1, 2] = torch.tensor([[-3.0, 3.0]])
    assert kse.kernel_sparsity(w).tolist() == [3.5, 0.0, 6.0]


def test_entropy_known_answer():
    # channel 0: 3 kernels (1-D values 0, 1, 3), k=1: dm = [1, 1, 2] -> p = [.25, .25, .5] -> 1.5 bits
    w = torch.tensor([0.0, 1.0, 3.0]).view(3, 1, 1, 1)
    assert kse.kernel_entropy(w, k=1).item() == pytest.approx(1.5)
    # k=2 (= N - 1): dm = [1+3, 1+2, 2+3] = [4, 3, 5] / 12
    p = torch.tensor([4, 3, 5]) / 12
    assert kse.kernel_entropy(w, k=2).item() == pytest.approx(float(-(p * p.log2()).sum()))


@pytest.mark.parametrize("shape,k", [((7, 4, 3, 3), 5), ((5, 3, 1, 1), 5), ((3, 2, 2, 3), 1), ((16, 6, 3, 3), 3),
                                     ((40, 5, 1, 1), 5), ((9, 3, 1, 1), 2), ((6, 2, 1, 1), 5), ((2, 3, 1, 1), 1)])
def test_entropy_matches_slow_loop(shape, k, slow_entropy):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(kse.kernel_entropy(w, k).double(), slow_entropy(w, k), rtol=1e-5, atol=1e-6)


def test_entropy_1x1_with_ties_matches_slow_loop(slow_entropy):
    # scalar kernels with repeated values and clusters: the sorted-neighbour path must pick the
    # same distances as a full search
    g = torch.Generator().manual_seed(2)
    w = torch.randint(-3, 4, (30, 6, 1, 1), generator=g).float() / 2
    w[:, 1] = 0.0
    w[::2, 2] = 5.0
    torch.testing.assert_close(kse.kernel_entropy(w, 5).double(), slow_entropy(w, 5), rtol=1e-6, atol=1e-9)


def test_entropy_edge_cases_are_finite():
    assert kse.kernel_entropy(torch.randn(1, 4, 3, 3)).tolist() == [0.0] * 4  # N = 1
    zeros = kse.kernel_entropy(torch.zeros(8, 2, 3, 3))  # every dm = 0: uniform
    torch.testing.assert_close(zeros, torch.full((2,), 3.0))
    dup = torch.randn(1, 1, 3, 3).repeat(6, 3, 1, 1)
    dup[0, 1] += 1  # one kernel differs: some dm are 0, some not
    e = kse.kernel_entropy(dup)
    assert torch.isfinite(e).all() and e[0] == pytest.approx(math.log2(6))
    assert torch.isfinite(kse.kernel_entropy(torch.randn(3, 2, 3, 3), k=5)).all()  # N <= k


def test_paper_entropy_differs_from_official_layout():
    # input channel 0: six near-identical kernels and two outliers (dm very uneven: low
    # entropy); every other channel: random kernels (dm about even: high entropy)
    g = torch.Generator().manual_seed(0)
    N = 8
    w = torch.randn(N, N, 3, 3, generator=g)
    w[:, 0] = 0.01 * torch.randn(N, 3, 3, generator=g)
    w[6:, 0] += torch.tensor([5.0, -5.0]).view(2, 1, 1)
    paper, official = kse.kernel_entropy(w), official_layout_entropy(w)
    # the paper's entropy sees channel 0's tight pairs; the official layout scores output filter 0
    assert paper[0] < paper[1:].min()
    assert not torch.allclose(paper, official)
    # and for a square layer the official value for "channel c" is the paper's formula applied to W[c, :]
    torch.testing.assert_close(official, kse.kernel_entropy(w.transpose(0, 1).contiguous()))


def test_indicator_known_answer():
    # 2 channels: sparsity normalises to [1, 0]; v = sqrt(s / (1 + e)) -> [>0, 0] -> [1, 0]
    w = torch.zeros(4, 2, 1, 1)
    w[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    v = kse.kse_indicator(w)
    assert v.tolist() == [1.0, 0.0]
    # three channels, alpha = 0: v = sqrt(s_norm) normalised
    w = torch.zeros(3, 3, 1, 1)
    w[:, 0] = 1.0
    w[:, 1] = 0.25  # s = [3, .75, 0] -> s_norm [1, .25, 0] -> sqrt [1, .5, 0]
    torch.testing.assert_close(kse.kse_indicator(w, alpha=0.0), torch.tensor([1.0, 0.5, 0.0]))


def test_indicator_formula_with_entropy(slow_entropy):
    w = torch.randn(10, 5, 3, 3, generator=torch.Generator().manual_seed(3))
    s = minmax_normalize(kse.kernel_sparsity(w).double())
    e = minmax_normalize(slow_entropy(w))
    expected = minmax_normalize(torch.sqrt(s / (1 + 2.0 * e)))
    torch.testing.assert_close(kse.kse_indicator(w, alpha=2.0).double(), expected, rtol=1e-5, atol=1e-6)


def test_indicator_all_equal_channels_is_one():
    w = torch.ones(4, 3, 3, 3)
    assert kse.kse_indicator(w).tolist() == [1.0, 1.0, 1.0]


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 12), C=st.integers(1, 6), kh=st.integers(1, 3), kw=st.integers(1, 3), seed=st.integers(0, 99))
def test_indicator_range_property(N, C, kh, kw, seed):
    w = torch.randn(N, C, kh, kw, generator=torch.Generator().manual_seed(seed))
    v = kse.kse_indicator(w)
    assert v.shape == (C,) and torch.isfinite(v).all() and v.min() >= 0 and v.max() <= 1
    if C > 1 and v.max() > v.min():
        assert v.max() == 1 and v.min() == 0


@pytest.mark.parametrize("G,T,N,cases", [
    (4, 0, 64, [(0.0, 0), (0.2499, 0), (0.25, 16), (0.4999, 16), (0.5, 32), (0.7499, 32), (0.75, 64), (1.0, 64)]),
    (5, 0, 64, [(0.1999, 0), (0.2, 8), (0.4, 16), (0.6, 32), (0.7999, 32), (0.8, 64), (1.0, 64)]),
    (5, 1, 64, [(0.1999, 0), (0.2, 4), (0.4, 8), (0.6, 16), (0.8, 32), (0.8001, 64), (0.9999, 64), (1.0, 64)]),
    (6, 0, 64, [(1 / 6 - 1e-4, 0), (1 / 6, 4), (2 / 6, 8), (3 / 6, 16), (4 / 6, 32), (5 / 6, 64), (1.0, 64)]),
    (6, 1, 64, [(1 / 6, 2), (2 / 6, 4), (5 / 6, 32), (1.0, 64)]),
    (4, 0, 3, [(0.25, 1), (0.5, 2), (0.75, 3)]),  # ceil: q = 1 happens
    (4, 1, 2, [(0.25, 1), (0.5, 1), (0.75, 1), (1.0, 2)]),
])
def test_centroid_counts_bucket_edges(G, T, N, cases):
    v = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    assert kse.centroid_counts(v, N, G, T).tolist() == [c[1] for c in cases]


@pytest.mark.parametrize("kwargs,match", [
    (dict(G=1), "G must be an integer >= 2, got 1"),
    (dict(G=4.0), "G must be an integer"),
    (dict(G=2**70), "G must be an integer <= 1048576, got 1180591620717411303424"),
    (dict(T=-1), "T must be an integer >= 0, got -1"),
    (dict(T=10**30), "T must be an integer <= 1048576, got 10{30}"),
])
def test_centroid_counts_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kse.centroid_counts(torch.tensor([0.5]), 8, **{"G": 4, "T": 0, **kwargs})


def _counts_reference(v: float, N: int, G: int, T: int) -> int:
    """Eq. 8, one channel at a time: the bucket from the float64 product v * G (as the library and the
    paper's floor(v*G) on floating-point indicators), the count in exact rational arithmetic."""
    from fractions import Fraction

    vG = Fraction(v * G)
    g = math.floor(vG)
    if g == 0:
        return 0
    if math.ceil(vG) == G:
        return N
    return min(N, math.ceil(N * Fraction(2) ** (g + 1 - T - G)))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=8), st.integers(1, 2**40),
       st.sampled_from([2, 3, 4, 5, 7, 64, 1100, 2**20]), st.sampled_from([0, 1, 2, 5, 52, 63, 64, 1100, 2**20]))
def test_centroid_counts_match_exact_arithmetic(values, N, G, T):
    """Counts computed in integers: a large T or G gives q = 1 (float64 underflowed to q = 0 at T = 1100)."""
    got = kse.centroid_counts(torch.tensor(values, dtype=torch.float64), N, G, T).tolist()
    assert got == [_counts_reference(v, N, G, T) for v in values]


def test_centroid_counts_large_shift_keeps_one_centroid():
    assert kse.centroid_counts(torch.tensor([0.3, 0.6, 0.9, 0.1]), 64, 4, 1100).tolist() == [1, 1, 64, 0]


def test_bad_weights_raise():
    with pytest.raises(ValueError, match="NaN or Inf"):
        kse.kse_indicator(torch.tensor(float("nan")).expand(2, 2, 3, 3).clone())
    with pytest.raises(ValueError, match=r"Tensor\[N, C, kh, kw\]"):
        kse.kernel_sparsity(torch.randn(3, 3))
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0, got -1"):
        kse.kse_indicator(torch.randn(2, 2, 3, 3), alpha=-1)
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        kse.kernel_entropy(torch.randn(2, 2, 3, 3), k=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_bucket_like_float64(dtype):
    w = torch.randn(64, 64, 3, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    v = kse.kse_indicator(w)
    assert v.dtype == torch.float32
    from kse.indicator import _indicator64

    ref = kse.centroid_counts(_indicator64(w.double(), 1.0, 5), 64, 4)
    from kse.compress import plan

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.Conv2d(64, 64, 3)).to(dtype)
    with torch.no_grad():
        net[1].weight.copy_(w)
    got = plan(net, kse.KSEConfig())[0].counts
    assert torch.equal(got, ref)


def test_centroid_counts_bad_indicator():
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got shape \(2,\) with values in \[-0.5, 1\]"):
        kse.centroid_counts(torch.tensor([-0.5, 1.0]), 8)
    with pytest.raises(ValueError, match="out_channels must be an integer >= 1, got 0"):
        kse.centroid_counts(torch.tensor([0.5]), 0)


def _ablation_weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 16, 3, 3, generator=g) * torch.linspace(0.2, 2.0, 16).view(1, 16, 1, 1)
    w[:, 5] = 0.01 * torch.randn(16, 3, 3, generator=g)  # weak, tightly clustered channel
    w[:8, 5] += 3.0  # two clusters: low entropy
    return w


def test_ablation_scores_follow_their_formulas():
    from kse.indicator import _indicator64, indicator_from_scores, kernel_sparsity

    w = _ablation_weight().double()
    s = minmax_normalize(kernel_sparsity(w))
    e = minmax_normalize(kse.kernel_entropy(w))
    # sparsity alone is Eq. 7 with alpha = 0, whatever alpha says
    torch.testing.assert_close(_indicator64(w, 1.0, 5, "sparsity"), minmax_normalize(torch.sqrt(s)))
    torch.testing.assert_close(_indicator64(w, 1.0, 5, "sparsity"), _indicator64(w, 0.0, 5))
    # entropy alone: v = sqrt(1 / (1 + e)) normalised, so the order is the reverse of e's
    ent = _indicator64(w, 1.0, 5, "entropy")
    torch.testing.assert_close(ent, minmax_normalize(torch.sqrt(1 / (1 + e))))
    assert torch.equal(torch.argsort(ent), torch.argsort(e, descending=True)) or torch.unique(e).numel() < 16
    # the default is the method itself
    torch.testing.assert_close(_indicator64(w, 1.0, 5), indicator_from_scores(s, e, 1.0))
    # official layout: the entropy term comes from the authors' reshape, not from W[:, c]
    off = _indicator64(w, 1.0, 5, "kse", "official")
    torch.testing.assert_close(off, indicator_from_scores(s, minmax_normalize(official_layout_entropy(w)), 1.0))
    assert not torch.allclose(off, _indicator64(w, 1.0, 5))
