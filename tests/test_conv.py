"""KSEConv2d: training form vs dense reference, deploy forms, centroid gradients, removal."""

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kse.conv import KSEConv2d
from kse.kmeans import cluster_kernels, cluster_many
from kse.serialization import local_assignment
from kse.training_weight import gather_elements


@pytest.fixture(scope="module")
def make_layer(seeded_conv):
    """``make_layer(...)``: a seeded conv, its KSE layer and the counts (random with the first
    channel dropped and the last kept with one centroid, unless given)."""
    return functools.partial(_make_layer, seeded_conv)


def _make_layer(seeded_conv, C=6, N=8, k=(3, 3), stride=1, padding=1, dilation=1, bias=True, seed=0, counts=None):
    conv, g = seeded_conv(C, N, k, stride, padding, dilation, bias, seed)
    if counts is None:
        counts = torch.randint(0, N + 1, (C,), generator=g)
        counts[0] = 0
        counts[-1] = 1
    return conv, KSEConv2d.from_conv(conv, counts), counts


def test_training_form_matches_loop_reference_and_to_conv(reference_forward, make_layer):
    conv, layer, counts = make_layer()
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), layer.to_conv()(x), rtol=1e-5, atol=1e-5)
    # counts respected; each kernel replaced by the mean of its cluster
    assert layer.centroid_counts.tolist() == counts[counts > 0].tolist()
    assert layer.kept_channels.tolist() == torch.nonzero(counts > 0).flatten().tolist()


def test_full_count_keeps_kernels_exactly(make_layer):
    conv, layer, _ = make_layer(counts=torch.full((6,), 8))
    x = torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(layer(x), conv(x))
    assert layer.compression_ratio() == pytest.approx(1.0)


@pytest.mark.parametrize("counts", [[0, 1, 3, 6], [0, 0, 3, 6], [2, 1, 3, 6]])  # 3/4, 2/4, 4/4 channels kept
def test_centroid_gradient_is_sum_of_member_kernel_gradients(counts, make_layer):
    # 3/4 kept trains through zero kernels over all channels, 2/4 gathers the kept input channels
    conv, layer, _ = make_layer(C=4, N=6, counts=torch.tensor(counts))
    layer = layer.double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    F.conv2d(ref_x, layer.to_conv().weight.detach(), layer.bias.detach(), 1, 1).square().sum().backward()
    # gradient w.r.t. the rebuilt dense weight, mapped back by hand
    w = layer.clustered_weight().detach().requires_grad_(True)
    y = F.conv2d(x.detach().index_select(1, layer.kept_channels), w, layer.bias, layer.stride, layer.padding)
    y.square().sum().backward()
    expected = torch.zeros_like(layer.centroids)
    for j in range(len(layer.kept_channels)):
        for n in range(layer.out_channels):
            expected[layer.assignment[j, n]] += w.grad[n, j]
    layer(x).square().sum().backward()
    torch.testing.assert_close(layer.centroids.grad, expected)
    torch.testing.assert_close(x.grad, ref_x.grad)  # the input gradient of the equivalent dense conv
    assert torch.autograd.gradcheck(lambda c: F.conv2d(x.detach().index_select(1, layer.kept_channels), c[layer.assignment].transpose(0, 1),
                                                       None, 1, 1), (layer.centroids.detach().clone().requires_grad_(True),))


@settings(max_examples=25, deadline=None)
@given(C=st.integers(1, 6), N=st.integers(1, 9), kh=st.integers(1, 3), kw=st.integers(1, 3),
       stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2), bias=st.booleans(),
       batch=st.integers(1, 3), seed=st.integers(0, 1000))
def test_deploy_forms_equal_training_form(C, N, kh, kw, stride, padding, dilation, bias, batch, seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, N + 1, (C,), generator=g)
    counts[-1] = max(int(counts[-1]), 1)  # at least one channel kept
    conv = nn.Conv2d(C, N, (kh, kw), stride, padding, dilation, bias=bias)
    layer = KSEConv2d.from_conv(conv, counts, torch.Generator().manual_seed(seed))
    size = dilation * (max(kh, kw) - 1) + 3
    x = torch.randn(batch, C, size, size + 1, generator=g)
    with torch.no_grad():
        ref = layer(x)
        torch.testing.assert_close(ref, layer.to_conv()(x), rtol=1e-5, atol=1e-5)
        for form in ("dense", "full", "split"):
            layer.set_form(form)
            torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))
        layer.set_form("train")


def test_remove_in_and_out_channels_keeps_function(make_layer):
    conv, layer, counts = make_layer(C=6, N=8, counts=torch.tensor([0, 2, 0, 4, 8, 1]))
    x = torch.randn(2, 6, 8, 8)
    y = layer(x)
    fewer_in = layer.remove_in_channels([0, 2])
    torch.testing.assert_close(fewer_in(x[:, [1, 3, 4, 5]]), y)
    fewer_out = layer.remove_out_channels([1, 5, 6])
    torch.testing.assert_close(fewer_out(x), y[:, [0, 2, 3, 4, 7]])
    assert fewer_out.centroids.shape[0] <= layer.centroids.shape[0]
    with pytest.raises(ValueError, match="still reads them"):
        layer.remove_in_channels([1])


def test_from_conv_rejects_unsupported_layers():
    with pytest.raises(ValueError, match="groups == 1"):
        KSEConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), torch.ones(4, dtype=torch.long))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        KSEConv2d.from_conv(nn.Linear(3, 3), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="counts must be"):
        cluster_kernels(torch.randn(4, 2, 3, 3), torch.tensor([5, 1]))


def test_extra_repr_reports_compression(make_layer):
    _, layer, _ = make_layer(counts=torch.tensor([0, 2, 2, 4, 8, 8]))
    text = repr(layer)
    assert "kept=5/6" in text and "centroids=24" in text and f"ratio={6 * 8 / 24:.2f}x" in text


def test_centroids_are_means_of_member_kernels(make_layer):
    conv, layer, counts = make_layer(C=4, N=12, counts=torch.tensor([3, 5, 1, 12]))
    w = conv.weight.detach()
    for j, c in enumerate(layer.kept_channels.tolist()):
        local = local_assignment(layer)[j]
        for idx in local.unique():
            members = w[local == idx, c]
            torch.testing.assert_close(layer.centroids[layer.assignment[j][local == idx][0]], members.mean(0))


def test_cached_forms_train_and_refresh(make_layer):
    conv, layer, _ = make_layer()
    x = torch.randn(2, 6, 8, 8)
    layer.set_form("dense")
    layer.train()
    layer(x).sum().backward()
    assert layer.centroids.grad is not None and layer.centroids.grad.abs().sum() > 0
    layer.eval()
    with torch.no_grad():
        before = layer(x)
        layer.load_state_dict({**layer.state_dict(), "centroids": layer.centroids * 2})  # rebuilds
        torch.testing.assert_close(layer(x) - layer.bias.view(1, -1, 1, 1), 2 * (before - layer.bias.view(1, -1, 1, 1)))
        layer.set_form("split")
        doubled = layer(x)
        layer.centroids.mul_(0.5)  # an in-place edit in eval mode: the prepared tensors stay as they were ...
        torch.testing.assert_close(layer(x), doubled)
        layer.refresh()  # ... until refreshed
        torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
        layer.centroids.mul_(2)
        layer.train().eval()  # switching modes refreshes too
        torch.testing.assert_close(layer(x), doubled, rtol=1e-5, atol=1e-5)


def test_eval_mode_fine_tuning_follows_the_steps(reference_forward, make_layer):
    # a call that records gradients runs the training form and drops the prepared tensors, so
    # the optimizer step after it is seen by the next inference call without a refresh
    conv, layer, _ = make_layer()
    layer.eval()
    x = torch.randn(2, 6, 8, 8)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extension", [True, False])
@pytest.mark.parametrize("counts", [[0, 3, 1, 5, 2, 8], [0, 0, 0, 5, 2, 8]])  # all channels convolved, and gathered
def test_training_weight_follows_edits_of_the_assignment(extension, counts, monkeypatch, make_layer):
    # W' for training comes from index tensors cached per layer: a new assignment / kept-channel
    # buffer rebuilds them, an in-place edit after refresh()
    import kse.training_weight

    monkeypatch.setattr(kse.training_weight, "_EXPAND_EXTENSION", extension)
    conv, layer, _ = make_layer(counts=torch.tensor(counts))
    layer.train()
    x = torch.randn(2, 6, 7, 7)

    def check():
        out = layer(x)
        out.sum().backward()  # through the cached rows as well
        torch.testing.assert_close(out, layer.to_conv()(x), rtol=1e-5, atol=1e-5)

    check()
    j = int((layer.centroid_counts > 1).nonzero()[0])  # a kept channel with two centroids or more
    with torch.no_grad():
        layer.assignment[j] = layer.assignment[j].max()  # in place: every kernel of it on one centroid
    layer.refresh()  # in-place edits of a buffer need a refresh
    check()
    layer.assignment = layer.assignment.flip(1).clone()  # a new buffer (output channels permuted): no refresh
    check()
    layer.kept_channels = layer.kept_channels.flip(0).clone()  # a new buffer: each slot reads another channel
    check()
    with torch.no_grad():
        layer.kept_channels[0] = 0  # in place: channel 0 (dropped so far) instead
    layer.refresh()
    check()


def test_float64_layer_keeps_precision():
    conv = nn.Conv2d(3, 4, 3).double()
    layer = KSEConv2d.from_conv(conv, torch.tensor([4, 2, 4]))
    assert layer.centroids.dtype == torch.float64
    w = conv.weight.detach()
    torch.testing.assert_close(layer.clustered_weight()[:, [0, 2]], w[:, [0, 2]], rtol=0, atol=0)


def test_cluster_many_gives_each_layer_what_it_gets_alone():
    # layers of equal kernel shape and count share batched k-means calls; every layer still
    # draws from its own generator, so its clusters do not depend on the company it keeps
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(16, 6, 3, 3, generator=g), torch.randn(16, 5, 3, 3, generator=g),
               torch.randn(32, 4, 1, 1, generator=g), torch.randn(16, 3, 3, 3, generator=g)]
    counts = [torch.tensor([0, 4, 4, 8, 16, 2]), torch.tensor([4, 4, 1, 8, 0]), torch.tensor([8, 8, 3, 32]),
              torch.tensor([4, 2, 2])]
    calls = []

    def counting_map(fn, keys):
        calls.extend(keys)
        return map(fn, keys)

    jobs = [(w, c, torch.Generator().manual_seed(10 + i)) for i, (w, c) in enumerate(zip(weights, counts))]
    together = cluster_many(jobs, n_init=2, map_fn=counting_map)
    # distinct (N, D, q): (16,9,4) (16,9,8) (16,9,16) (16,9,2) (16,9,1) (32,1,8) (32,1,3) (32,1,32)
    assert len(calls) == 8
    for i, (w, c) in enumerate(zip(weights, counts)):
        alone = cluster_kernels(w, c, torch.Generator().manual_seed(10 + i), n_init=2)
        for a, b in zip(together[i], alone):
            assert torch.equal(a, b)


def test_gather_elements_gradient_and_zero_row():
    rows = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 15, 7, 7, 12, 16, 5])  # elements of the [6, 3] table; 15, 16: the zero row
    out = gather_elements(rows, index)
    assert torch.equal(out[[1, 5]], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(out[[0, 2, 3, 4, 6]], rows.detach().flatten()[[0, 7, 7, 12, 5]])
    assert torch.autograd.gradcheck(lambda r: gather_elements(r, index), (rows,))


@pytest.mark.parametrize("counts", [[2, 1, 3, 6], [0, 0, 3, 6]])
def test_training_weight_in_the_input_memory_format(counts, reference_forward, make_layer):
    _, layer, _ = make_layer(C=4, N=6, counts=torch.tensor(counts))
    layer = layer.double().train()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y = layer(x)
    g = torch.autograd.grad(y.square().sum(), layer.centroids)[0]
    y_cl = layer(x_cl)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    g_cl = torch.autograd.grad(y_cl.square().sum(), layer.centroids)[0]
    torch.testing.assert_close(y_cl, y)
    torch.testing.assert_close(g_cl, g)
    torch.testing.assert_close(y, reference_forward(layer, x))


@pytest.mark.parametrize("counts", [[2, 1, 3, 6], [0, 0, 3, 6]])  # the zero-kernel and the gather path
def test_training_weight_follows_a_new_assignment(counts, reference_forward, make_layer):
    _, layer, _ = make_layer(C=4, N=6, counts=torch.tensor(counts))
    layer.train()
    x = torch.randn(2, 4, 5, 5)
    before = layer(x)
    other = layer.assignment.clone()
    other[-1] = other[-1].roll(1)  # the last kept channel (q = 6) permutes its kernels
    layer.load_state_dict({**layer.state_dict(), "assignment": other})
    after = layer(x)
    torch.testing.assert_close(after, reference_forward(layer, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("form", ["train", "dense", "full", "split", "dense@1,split@8"])
def test_layer_without_kept_channels_answers_its_bias(form, make_layer):
    conv, layer, _ = make_layer(C=3, N=4, counts=torch.zeros(3, dtype=torch.long))
    x = torch.randn(2, 3, 5, 5)
    layer.train() if form == "train" else layer.eval().set_form(form)
    y = layer(x)
    assert y.shape == (2, 4, 5, 5)
    torch.testing.assert_close(y, layer.bias.detach().view(1, 4, 1, 1).expand(2, 4, 5, 5))
    if form == "train":
        y.sum().backward()
        torch.testing.assert_close(layer.bias.grad, torch.full((4,), 50.0))


@pytest.mark.parametrize("sparse", [False, True])
def test_layer_pickles_and_rebuilds_on_load(sparse, monkeypatch, make_layer):
    import pickle

    import kse.forms

    if sparse:
        monkeypatch.setattr(kse.forms, "DENSE_FUSION_MAX_RATIO", 0)
        monkeypatch.setattr(kse.forms, "DENSE_FUSION_MAX_ELEMENTS", 0)
    conv, layer, _ = make_layer()
    layer.set_form("split").eval()
    copy_ = pickle.loads(pickle.dumps(layer))
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(copy_(x), layer(x))
    copy_.load_state_dict({**layer.state_dict(), "centroids": layer.centroids * 2})  # rebuilds its tensors
    with torch.no_grad():
        torch.testing.assert_close(copy_(x) - layer.bias.view(1, -1, 1, 1), 2 * (layer(x) - layer.bias.view(1, -1, 1, 1)))


@pytest.mark.parametrize("form", ["train", "dense", "full", "split", "fused"])
def test_unbatched_input_works_in_every_form(form):
    """[C, H, W] as nn.Conv2d takes it (dense, split and fused raised index errors)."""
    from kse import fused

    if form == "fused" and not fused.available():
        pytest.skip(f"no fused kernel: {fused.build_error()}")
    conv = nn.Conv2d(8, 16, 3, padding=1)
    layer = KSEConv2d.from_conv(conv, torch.tensor([0, 1, 2, 4, 4, 8, 16, 16])).eval().set_form(form)
    x = torch.randn(8, 10, 10)
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(out, layer(x.unsqueeze(0)).squeeze(0), rtol=0, atol=0)
        torch.testing.assert_close(out, layer.to_conv()(x), rtol=1e-5, atol=1e-5)
    assert out.shape == (16, 10, 10)


def test_configure_training_switches_and_restores(monkeypatch, make_layer):
    import kse.training_weight

    monkeypatch.setattr(kse.training_weight, "_EXPAND_EXTENSION", True)
    monkeypatch.setattr(kse.training_weight, "_SELECT_MAX_KEPT", 2 / 3)
    _, layer, _ = make_layer(C=6, counts=torch.tensor([0, 3, 1, 5, 2, 8]))  # 5 of 6 kept
    layer.train()
    assert layer.training_weight().shape[1] == 6  # all input channels, zero kernels for the dropped one
    before = kse.training_weight.configure_training(extension=False, select_max_kept=0.9)
    assert before == {"extension": True, "select_max_kept": pytest.approx(2 / 3)}
    assert layer.training_weight().shape[1] == 5  # 5/6 <= 0.9: the kept channels gathered
    assert kse.training_weight.configure_training(**before) == {"extension": False, "select_max_kept": 0.9}
    for bad in (1.5, float("nan")):
        with pytest.raises(ValueError, match="select_max_kept must be a fraction in"):
            kse.training_weight.configure_training(select_max_kept=bad)
