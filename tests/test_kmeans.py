"""Batched k-means: correctness against a per-set reference, determinism, edge cases."""

import pytest
import torch

from kse.kmeans import batched_kmeans, kmeans_plusplus


def test_recovers_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = torch.arange(30) % 3
    pts = (centers[labels] + 0.1 * torch.randn(30, 2, generator=g)).expand(4, 30, 2).contiguous()
    cents, assign = batched_kmeans(pts, 3, generator=torch.Generator().manual_seed(1), n_init=3)
    for b in range(4):
        # same partition as the true labels (up to renaming)
        mapping = {int(a): int(l) for a, l in zip(assign[b], labels)}
        assert len(set(mapping.values())) == 3
        assert all(mapping[int(a)] == int(l) for a, l in zip(assign[b], labels))


def test_centroids_are_means_of_their_members():
    pts = torch.randn(5, 40, 9, generator=torch.Generator().manual_seed(2))
    cents, assign = batched_kmeans(pts, 6)
    for b in range(5):
        for j in assign[b].unique():
            torch.testing.assert_close(cents[b, j], pts[b][assign[b] == j].mean(0), rtol=1e-5, atol=1e-5)
        # every point sits with its nearest centroid (Lloyd fixed point)
        d = torch.cdist(pts[b], cents[b])
        assert torch.equal(d.argmin(1), assign[b]) or torch.allclose(d.gather(1, assign[b][:, None]).squeeze(1), d.min(1).values)


def test_matches_per_set_reference_inertia():
    """Batched inertia is close to sklearn's per-set KMeans (the official code's way)."""
    sklearn = pytest.importorskip("sklearn.cluster")
    pts = torch.randn(6, 64, 9, generator=torch.Generator().manual_seed(3))
    cents, assign = batched_kmeans(pts, 8, n_init=3)
    ours = ((pts - cents.gather(1, assign[..., None].expand(-1, -1, 9))) ** 2).sum((1, 2))
    ref = torch.tensor([sklearn.KMeans(8, n_init=10, random_state=0).fit(p.numpy()).inertia_ for p in pts])
    assert (ours.double() <= ref.double() * 1.10).all(), (ours, ref)


def test_deterministic_for_a_seed():
    pts = torch.randn(3, 50, 4, generator=torch.Generator().manual_seed(4))
    a = batched_kmeans(pts, 5, generator=torch.Generator().manual_seed(7))
    b = batched_kmeans(pts, 5, generator=torch.Generator().manual_seed(7))
    c = batched_kmeans(pts, 5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_duplicates_zero_and_q_edges():
    dup = torch.ones(2, 10, 9)
    cents, assign = batched_kmeans(dup, 4)  # fewer distinct points than centroids
    assert torch.isfinite(cents).all() and (assign >= 0).all() and (assign < 4).all()
    cents, assign = batched_kmeans(torch.zeros(1, 5, 9), 2)
    assert torch.equal(cents, torch.zeros(1, 2, 9))
    pts = torch.randn(2, 6, 3)
    cents, assign = batched_kmeans(pts, 1)
    torch.testing.assert_close(cents[:, 0], pts.mean(1))
    cents, assign = batched_kmeans(pts, 6)
    assert torch.equal(cents, pts) and torch.equal(assign[0], torch.arange(6))


def test_kmeans_plusplus_picks_distinct_points():
    pts = torch.arange(20.0).view(1, 20, 1)
    seeds = kmeans_plusplus(pts, 20, torch.Generator().manual_seed(0))
    assert len(seeds[0].flatten().unique()) == 20  # D^2 sampling never re-picks a chosen point


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"q must be an integer in \[1, 5\], got 6"):
        batched_kmeans(torch.randn(1, 5, 2), 6)
    with pytest.raises(ValueError, match=r"Tensor\[B, N, D\]"):
        batched_kmeans(torch.randn(5, 2), 2)


def test_1d_lloyd_matches_general_lloyd():
    from kse.kmeans import _lloyd, _lloyd_1d

    pts = torch.randn(6, 200, 1, generator=torch.Generator().manual_seed(5))
    seeds = kmeans_plusplus(pts, 7, torch.Generator().manual_seed(1))
    c_gen, a_gen, i_gen = _lloyd(pts, seeds, 100)
    c_1d, a_1d, i_1d = _lloyd_1d(pts, seeds, 100)
    torch.testing.assert_close(i_1d, i_gen, rtol=1e-5, atol=1e-5)
    for b in range(6):  # same partition (centroid order may differ)
        pairs = set(zip(a_gen[b].tolist(), a_1d[b].tolist()))
        assert len(pairs) == len(set(a_gen[b].tolist()))


def test_chunking_gives_the_same_result(monkeypatch):
    import kse.indicator as ind
    import kse.kmeans as km

    w = torch.randn(20, 12, 3, 3, generator=torch.Generator().manual_seed(6))
    whole = ind.kernel_entropy(w)
    pts = torch.randn(9, 30, 4, generator=torch.Generator().manual_seed(7))
    ref = batched_kmeans(pts, 3, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(ind, "_CHUNK_BYTES", 1)
    monkeypatch.setattr(km, "_CHUNK_ELEMS", 1)
    torch.testing.assert_close(ind.kernel_entropy(w), whole)
    got = batched_kmeans(pts, 3, generator=torch.Generator().manual_seed(0))
    assert got[1].shape == ref[1].shape and torch.isfinite(got[0]).all()


def _seed_reference(points, first, uniforms):
    """k-means++ for one set at a time with one cumulative sum over all points (float64)."""
    B, N, D = points.shape
    out = torch.empty(B, uniforms.shape[1], D)
    for i in range(B):
        pts = points[i].double()
        chosen = [int(first[i])]
        for u in uniforms[i, 1:].double():
            d2 = torch.stack([((pts - pts[c]) ** 2).sum(-1) for c in chosen]).min(0).values
            cdf = d2.cumsum(0)
            chosen.append(min(int(torch.searchsorted(cdf, u * cdf[-1], right=True)), N - 1))
        out[i] = points[i, chosen]
    return out


@pytest.mark.parametrize("shape,q", [((6, 100, 1), 7), ((5, 64, 9), 6), ((4, 33, 2), 5), ((3, 31, 1), 4)])
def test_two_level_seeding_draws_like_one_cumulative_sum(shape, q):
    from kse.kmeans import _seed, draw_seeds

    pts = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    pts[0] = pts[0, :1]  # a set of duplicates: every distance 0 after the first pick
    first, uniforms = draw_seeds(shape[0], shape[1], q, 1, torch.Generator().manual_seed(9))
    torch.testing.assert_close(_seed(pts, first[0], uniforms[0]), _seed_reference(pts, first[0], uniforms[0]))


@pytest.mark.parametrize("q", [3, 128, 511])
def test_1x1_centroids_are_the_float64_means_of_their_members(q):
    # the scalar Lloyd path sums runs of sorted points from prefix sums; in float32 that lost up
    # to 1.5e-5 at N = 512, and a cluster of one point did not reproduce it
    pts = torch.randn(4, 512, 1, generator=torch.Generator().manual_seed(7))
    cents, assign = batched_kmeans(pts, q, generator=torch.Generator().manual_seed(3))
    for b in range(4):
        for j in assign[b].unique():
            want = pts[b][assign[b] == j].double().mean(0).float()
            assert (cents[b, j] - want).abs().max() <= 1e-7 * max(1.0, float(want.abs().max()))
