"""The fused centroid-conv + fusion CPU kernel: equal to the training form, chosen only when asked."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import kse
import kse.training_weight
from kse import fused
from kse.conv import KSEConv2d

pytestmark = [pytest.mark.usefixtures("one_thread"),  # one torch thread for the module
              pytest.mark.skipif(not fused.available(), reason=f"fused kernel not built: {fused.build_error()}")]


@pytest.mark.parametrize("C,N,k,p,H,W,B,bias", [
    (6, 8, 3, 1, 7, 9, 2, True), (16, 16, 3, 1, 28, 28, 3, False), (5, 7, 1, 0, 5, 5, 2, True),
    (4, 6, (3, 2), (1, 0), 6, 5, 1, True), (8, 8, 3, 0, 9, 9, 2, False), (3, 5, 5, 2, 4, 11, 1, True),
    (64, 64, 3, 1, 7, 7, 4, False), (4, 6, 1, 1, 5, 6, 2, True),  # padding wider than the kernel
    # same-size convolutions run in the compact layout (masked taps, tiles across images): maps
    # smaller than a tile, so that a tile spans several images; a 1x1 map, where every tap but
    # the centre is masked; a 5x5 and a 3x1 kernel (generic tap loop); a 1x1 kernel (no masks).
    # The others above with a different output size ((3, 2) kernel, padding 0, padding wider
    # than the kernel) run in the padded layout
    (7, 9, 3, 1, 3, 3, 7, True), (4, 5, 3, 1, 1, 1, 5, False), (3, 6, 5, 2, 6, 6, 3, True),
    (4, 6, (3, 1), (1, 0), 5, 6, 3, True), (5, 7, 1, 0, 5, 5, 5, True)])
def test_fused_equals_training_form(C, N, k, p, H, W, B, bias):
    g = torch.Generator().manual_seed(C * 31 + H)
    conv = nn.Conv2d(C, N, k, 1, p, bias=bias)
    counts = torch.randint(0, N + 1, (C,), generator=g)
    counts[-1] = max(1, int(counts[-1]))
    layer = KSEConv2d.from_conv(conv, counts).eval()
    x = torch.randn(B, C, H, W, generator=g)
    with torch.no_grad():
        ref = layer(x)
        layer.set_form("fused")
        got = layer(x)
        got_cl = layer(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(got_cl, got)
    assert got.is_contiguous()
    # a same-size convolution keeps a channels_last input's layout, the others answer NCHW
    assert got_cl.is_contiguous(memory_format=torch.channels_last) == (got.shape[2:] == x.shape[2:])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 9), st.integers(1, 12), st.sampled_from([(1, 1), (3, 3), (5, 5), (3, 1), (1, 3), (3, 5)]),
       st.integers(1, 11), st.integers(1, 11), st.integers(1, 6), st.booleans(), st.integers(0, 2 ** 16))
def test_fused_same_size_convolutions_match_for_any_map(C, N, k, H, W, B, relu, seed):
    """The compact layout's tap masks, at random sizes: maps smaller or larger than a tile, tiles
    across image boundaries, every kernel shape, with and without the ReLU epilogue."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(C, N, k, 1, (k[0] // 2, k[1] // 2), bias=True)
    counts = torch.randint(0, N + 1, (C,), generator=g)
    counts[int(torch.randint(0, C, (1,), generator=g))] = max(1, N // 2)
    layer = KSEConv2d.from_conv(conv, counts).eval()
    if relu:
        layer.set_epilogue(torch.rand(N, generator=g) + 0.5, torch.randn(N, generator=g), relu=True)
    x = torch.randn(B, C, H, W, generator=g)
    with torch.no_grad():
        ref = layer(x)
        layer.set_form("fused")
        got = layer(x)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        got_cl = layer(x_cl)  # read and written channels_last
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * max(float(ref.abs().max()), 1.0))
    torch.testing.assert_close(got_cl, got, rtol=0, atol=0)
    # (with C = 1 or a 1x1 map both layouts coincide, and the input counts as NCHW)
    assert got_cl.is_contiguous(memory_format=torch.channels_last) or x_cl.is_contiguous()


def test_fused_refuses_unsupported_layers_and_follows_centroid_updates():
    layer = KSEConv2d.from_conv(nn.Conv2d(4, 4, 3, stride=2), torch.tensor([2, 4, 1, 0]))
    with pytest.raises(ValueError, match="stride 1"):
        layer.set_form("fused")
    layer = KSEConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1), torch.tensor([2, 4, 1, 0])).eval()
    layer.set_form("fused")
    with torch.no_grad():
        layer.centroids.mul_(2)  # the kernel inputs are rebuilt after an in-place update and a refresh
        layer.refresh()
        x = torch.randn(1, 4, 6, 6)
        got = layer(x)
        torch.testing.assert_close(got, layer.train()(x), rtol=1e-5, atol=1e-5)


def test_deploy_measures_fused_only_when_asked_and_file_keeps_it(tmp_path, tiny_kse):
    net = tiny_kse()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ref = net(x)
    assert "fused" not in kse.deploy_(net, form="auto", input_size=(1, 16, 16), repeats=1).values()
    forced = kse.deploy_(net, form="fused")
    strided = {n for n, m in net.named_modules() if isinstance(m, KSEConv2d) and m.stride != (1, 1)}
    assert strided and {n for n, f in forced.items() if f == "dense"} == strided
    assert {f for n, f in forced.items() if n not in strided} == {"fused"}
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="candidates must be inference forms"):
        kse.deploy_(net, form="auto", input_size=(1, 16, 16), candidates=["train"])
    only = kse.deploy_(net, form="auto", input_size=(1, 16, 16), repeats=1, candidates=["fused"])
    assert {n for n, f in only.items() if f == "dense"} == strided  # the kernel alone: dense where it cannot run
    chosen = kse.deploy_(net, form="auto", input_size=(1, 16, 16), repeats=1, candidates=["dense", "fused"])
    assert all(chosen[n] == "dense" for n in strided)  # stride 2: the kernel does not apply
    kse.save(net, tmp_path / "net.kse", preprocess={"input_size": [1, 16, 16]})
    loaded = kse.load(tmp_path / "net.kse").eval()
    assert {n: m.form for n, m in loaded.named_modules() if isinstance(m, KSEConv2d)} == chosen
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-5)


def test_kse_bench_fused_column(tmp_path, ok, tiny_kse):
    net = tiny_kse()
    kse.save(net, tmp_path / "net.kse", preprocess={"input_size": [1, 16, 16]})
    out, _ = ok(["bench", "--checkpoint", tmp_path / "net.kse", "--batch-size", 2, "--repeats", 1, "--warmup", 0,
                 "--fused", "--json"])
    import json

    rows = json.loads(out)["results"][0]["layers"]
    assert all((r["fused_ms"] is None) == (r["name"].endswith("conv1") and ".0." in r["name"] and
                                            not r["name"].startswith("layer1")) for r in rows)


def test_form_per_batch_with_the_kernel_and_without_it_on_load(tmp_path, monkeypatch, tiny_kse, assert_same_function):
    net = tiny_kse()
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        ref = net(x)
    forced = kse.deploy_(net, form="fused@1,full@8")
    assert set(forced.values()) == {"fused@1,full@8", "dense@1,full@8"}  # stride 2 layers: no kernel
    with torch.no_grad():
        for b in (1, 5):  # 1: the kernel, 5: the zero-filled dense conv
            assert_same_function(net(x[:b]), ref[:b])
    kse.save(net, tmp_path / "net.kse")
    monkeypatch.setattr(fused, "available", lambda: False)  # a machine without a compiler
    with pytest.warns(RuntimeWarning, match="unavailable here"):
        loaded = kse.load(tmp_path / "net.kse")
    assert {m.form for m in loaded.modules() if isinstance(m, KSEConv2d)} == {"dense@1,full@8"}
    with torch.no_grad():
        assert_same_function(loaded(x), ref)


def test_fused_on_several_threads_equals_one_thread(assert_same_function):
    torch.manual_seed(3)
    conv = nn.Conv2d(24, 40, 3, 1, 1)
    counts = torch.randint(0, 41, (24,))
    counts[0] = 40
    layer = KSEConv2d.from_conv(conv, counts).eval()
    x = torch.randn(5, 24, 13, 11)
    with torch.no_grad():
        ref = layer(x)
        layer.set_form("fused")
        single = layer(x)
        threads = torch.get_num_threads()
        torch.set_num_threads(3)  # more threads than tiles per image: every split of the work
        try:
            multi = layer(x)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(multi, single)  # each output is computed by one thread, in one order
    assert_same_function(multi, ref)


@pytest.mark.parametrize("channels_last", [True, False])
def test_training_weight_on_several_threads_equals_one_thread(channels_last, monkeypatch):
    torch.manual_seed(4)
    conv = nn.Conv2d(150, 64, 3, 1, 1, bias=False)  # 150 columns: the backward splits them over threads
    counts = torch.randint(0, 12, (150,))
    layer = KSEConv2d.from_conv(conv, counts).train()
    upstream = torch.randn(64, 150, 3, 3)
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            w = layer.training_weight(channels_last, full=True)
            grads.append((w.detach(), torch.autograd.grad(w, layer.centroids, upstream)[0]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])  # same sums, same order
    stock = _train_weight(layer, True, channels_last, False, monkeypatch)
    torch.testing.assert_close(grads[1][1], torch.autograd.grad(stock, layer.centroids, upstream)[0])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
def test_traced_model_keeps_the_kernel_as_an_operator(tmp_path, tiny_kse, fresh_interpreter):
    model = tiny_kse()
    kse.deploy_(model, form="fused")
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        ref = model(x)
        traced = torch.jit.trace(model, torch.randn(1, 1, 16, 16))
    fused_layers = sum(m.form == "fused" for m in model.modules() if isinstance(m, KSEConv2d))
    assert fused_layers > 0 and str(traced.inlined_graph).count("kse::fused_conv") == fused_layers
    traced.save(str(tmp_path / "m.ts.pt"))
    # a fresh interpreter: the file needs the operator library, and runs once it is loaded
    refused, diff = fresh_interpreter("torch.jit.load", tmp_path / "m.ts.pt", x, ref, tmp_path)
    assert refused and diff < 1e-5


def test_operator_checks_its_indices():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = KSEConv2d.from_conv(conv, torch.tensor([2, 0, 6, 3])).eval().set_form("fused")
    d = fused.prepare(layer)
    x = torch.randn(1, 4, 5, 5)

    def run(**change):
        t = {**d, **change}
        return torch.ops.kse.fused_conv(x, t["kept"], t["cents"], t["offsets"], t["assign"], t["scale"], t["bias"],
                                        t["chunks"], 3, 3, 1, 1, False)

    torch.testing.assert_close(run(), layer(x))
    bad_assign = d["assign"].clone()
    bad_assign[0, 0] = int(d["offsets"][-1]) + 5  # a row past the centroid table
    cases = {"kept channel out of range": dict(kept=torch.tensor([0, 2, 9])),
             "one of channel c's centroid rows": dict(assign=bad_assign),
             "offsets must run from 0 to M": dict(offsets=d["offsets"] + 1),
             "scale and bias must be float32": dict(scale=torch.ones(5)),
             "assign must be int32": dict(assign=d["assign"].long())}
    for message, change in cases.items():
        with pytest.raises(RuntimeError, match=message):
            run(**change)


@pytest.mark.parametrize("N", [16, 300])
def test_chunks_cover_the_channels_within_the_row_limit(N, assert_same_function):
    torch.manual_seed(N)
    counts = torch.randint(1, N + 1, (40,))
    layer = KSEConv2d.from_conv(nn.Conv2d(40, N, 3, padding=1), counts)
    chunks = fused.prepare(layer)["chunks"].tolist()
    limit = max(128, 2 * N)
    assert fused.chunk_rows(N) == limit
    assert chunks[0] == 0 and chunks[-1] == 40 and chunks == sorted(set(chunks))
    for a, b in zip(chunks, chunks[1:]):
        rows = int(counts[a:b].sum())
        assert rows <= limit or b == a + 1  # a channel with more rows than the limit is a chunk alone
        if b < 40:
            assert rows + int(counts[b]) > limit  # greedy: the next channel did not fit
    x = torch.randn(2, 40, 5, 6)
    with torch.no_grad():
        ref = layer.eval()(x)
        layer.set_form("fused")
        assert_same_function(layer(x), ref)


def test_tap_mask_cache_is_bounded_and_rebuilt(assert_same_function):
    """7x7 kernels on maps of about 400x400 need about 31 MiB of tap masks each: the third shape
    empties the cache (64 MiB at most), and the first shape's masks are built again."""
    torch.manual_seed(5)
    layer = KSEConv2d.from_conv(nn.Conv2d(2, 3, 7, padding=3), torch.tensor([2, 3])).eval()
    with torch.no_grad():
        for H in (400, 401, 402, 400):
            x = torch.randn(1, 2, H, 400)
            ref = layer.train()(x)
            layer.eval().set_form("fused")
            assert_same_function(layer(x), ref)


def _train_weight(layer, full, channels_last, extension, monkeypatch):
    monkeypatch.setattr(kse.training_weight, "_EXPAND_EXTENSION", extension)
    return layer.training_weight(channels_last, full)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
# taps: 3 and 17 (gathers), 4, 6 and 16 (channels_last float32 through 16x16 transposes: its
# bounds and a case between), 25 (two vectors)
@pytest.mark.parametrize("k", [(1, 3), (2, 2), (3, 2), (4, 4), (1, 17), (5, 5)])
def test_training_weight_from_the_extension_equals_stock_operations(dtype, full, channels_last, k, monkeypatch):
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(19, 9, k, bias=False)  # 19 columns with full: a block of 16 and a tail
    counts = torch.tensor([0, 3, 1, 9, 0, 2, 5] + [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2])
    layer = KSEConv2d.from_conv(conv, counts).to(dtype).train()
    fast = _train_weight(layer, full, channels_last, True, monkeypatch)
    stock = _train_weight(layer, full, channels_last, False, monkeypatch)
    assert fast.grad_fn.name().endswith("ExpandWeight>") and not stock.grad_fn.name().endswith("ExpandWeight>")
    rows = kse.training_weight.kernel_rows(layer.assignment, layer.kept_channels, layer.in_channels, full)
    assert kse.training_weight.rows_are_disjoint(rows, len(layer.centroids))  # own centroids per channel: a parallel backward
    assert fast.shape == stock.shape == (9, 19 if full else 16, *k) and fast.stride() == stock.stride()
    assert torch.equal(fast, stock)
    for upstream in (torch.randn(stock.shape, generator=g), torch.randn(stock.shape, generator=g).contiguous(
            memory_format=torch.contiguous_format if channels_last else torch.channels_last)):  # either layout
        upstream = upstream.to(dtype)
        a, = torch.autograd.grad(fast, layer.centroids, upstream, retain_graph=True)
        b, = torch.autograd.grad(stock, layer.centroids, upstream, retain_graph=True)
        if dtype != torch.bfloat16:
            torch.testing.assert_close(a, b)
            continue
        # bfloat16: the extension sums in float32 and rounds once, the stock index_add sums in
        # bfloat16; both against the float64 sums
        ref = copy.deepcopy(layer).double()
        exact, = torch.autograd.grad(_train_weight(ref, full, channels_last, False, monkeypatch), ref.centroids,
                                     upstream.double())
        torch.testing.assert_close(a.double(), exact, rtol=8e-3, atol=8e-3 * float(exact.abs().max()))
        assert (a.double() - exact).abs().max() <= (b.double() - exact).abs().max()


def test_training_form_without_autograd_does_not_touch_the_extension(monkeypatch):
    layer = KSEConv2d.from_conv(nn.Conv2d(4, 5, 3, padding=1), torch.tensor([0, 3, 1, 5]))
    calls = []
    monkeypatch.setattr(fused, "available", lambda: calls.append(1) or True)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        y = layer.eval()(x)  # evaluating in the training form
    assert calls == [] and y.shape == (2, 5, 6, 6)
    layer.train()(x)
    assert calls == [1]


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("counts", [[0, 3, 1, 5], [0, 0, 2, 5]])  # all channels with zero kernels, and gathered
def test_gradient_of_the_centroid_gradient_equals_stock_operations(channels_last, counts, monkeypatch):
    # a second-order use (as in MAML or a penalty on parameter gradients): the centroid gradient
    # with create_graph, then the gradient of its norm
    torch.manual_seed(5)
    layer = KSEConv2d.from_conv(nn.Conv2d(4, 5, 3, padding=1), torch.tensor(counts)).double().train()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    second = []
    for extension in (True, False):
        monkeypatch.setattr(kse.training_weight, "_EXPAND_EXTENSION", extension)
        loss = layer(x).tanh().square().sum()
        g, = torch.autograd.grad(loss, layer.centroids, create_graph=True)
        second.append((g.detach(), torch.autograd.grad(g.square().sum(), layer.centroids)[0]))
    torch.testing.assert_close(second[0][0], second[1][0])
    assert second[1][1].abs().max() > 0
    torch.testing.assert_close(second[0][1], second[1][1])


@pytest.mark.parametrize("channels_last", [True, False])
def test_expand_weight_gradcheck_zero_kernels_and_bad_rows(channels_last):
    cents = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([[0, -1, 4], [2, 2, -1], [1, 4, 4]], dtype=torch.int32)
    w = fused.expand_weight(cents, rows, channels_last)
    assert w.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(w[0, 1], torch.zeros(2, 3, dtype=torch.float64)) and torch.equal(w[2, 1], cents[4].detach())
    assert torch.autograd.gradcheck(lambda c: fused.expand_weight(c, rows, channels_last), (cents,))  # shared rows
    own = torch.tensor([[0, 3, -1], [1, 4, 2], [1, 3, -1]], dtype=torch.int32)  # rows of a column serve it alone
    assert torch.autograd.gradcheck(lambda c: fused.expand_weight(c, own, channels_last, True), (cents,))
    for bad in ([[5]], [[-2]]):
        with pytest.raises(RuntimeError, match="row index is out of range"):
            fused.expand_weight(cents, torch.tensor(bad, dtype=torch.int32), channels_last)


@pytest.mark.parametrize("taps", [(3, 3), (1, 17)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_expand_weight_float32_with_shared_rows_equals_a_loop(taps, channels_last):
    # rows shared between columns (not a KSE layer: the serial backward), 37 columns (two blocks
    # of 16 and a tail), zero kernels; against W' and its gradient written out element by element
    g = torch.Generator().manual_seed(5)
    N, J, M = 7, 37, 11
    kh, kw = taps
    cents = torch.randn(M, kh, kw, generator=g, requires_grad=True)
    rows = torch.randint(-1, M, (N, J), generator=g, dtype=torch.int32)
    w = fused.expand_weight(cents, rows, channels_last)
    upstream = torch.randn(N, J, kh, kw, generator=g)
    grad, = torch.autograd.grad(w, cents, upstream)
    want_w = torch.zeros(N, J, kh, kw)
    want_g = torch.zeros(M, kh, kw, dtype=torch.float64)
    for n in range(N):
        for j in range(J):
            r = int(rows[n, j])
            if r >= 0:
                want_w[n, j] = cents[r].detach()
                want_g[r] += upstream[n, j].double()
    assert torch.equal(w, want_w)
    torch.testing.assert_close(grad.double(), want_g, rtol=1e-5, atol=1e-5)


def test_training_steps_with_the_extension_equal_stock_operations(monkeypatch, tiny_kse):
    torch.manual_seed(0)
    model = tiny_kse()
    models = {flag: copy.deepcopy(model).to(memory_format=torch.channels_last).train() for flag in (True, False)}
    x = torch.randn(4, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    for flag, m in models.items():
        monkeypatch.setattr(kse.training_weight, "_EXPAND_EXTENSION", flag)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    a, b = models[True].state_dict(), models[False].state_dict()
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in a.items() if k.endswith("centroids"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")  # from torch.func's own imports
def test_func_transforms_forward_ad_and_batched_gradients_equal_stock_operations(monkeypatch):
    # torch.func and forward-mode AD see stock operations (the C++ node supports neither); a
    # batched backward (is_grads_batched) reaches the node with gradients that have no storage
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    layer = KSEConv2d.from_conv(nn.Conv2d(6, 5, 3, padding=1), torch.tensor([0, 3, 1, 5, 2, 5])).double().train()
    x = torch.randn(3, 6, 7, 7, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    tangent = torch.randn_like(layer.centroids)

    def loss(p, xb):
        return torch.func.functional_call(layer, p, (xb,)).tanh().sum()

    def forward_ad():
        with fwAD.dual_level():
            c = fwAD.make_dual(layer.centroids.detach(), tangent)
            return fwAD.unpack_dual(torch.func.functional_call(layer, {"centroids": c}, (x,))).tangent

    def batched():
        y = layer(x).sum((0, 2, 3))
        return torch.autograd.grad(y, layer.centroids, torch.eye(5, dtype=y.dtype), is_grads_batched=True)[0]

    cases = {"grad": lambda: torch.func.grad(loss)(params, x)["centroids"],
             "per-sample grad": lambda: torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(
                 params, x.unsqueeze(1))["centroids"],
             "forward AD": forward_ad, "is_grads_batched": batched}
    for name, case in cases.items():
        got = {}
        for extension in (True, False):
            monkeypatch.setattr(kse.training_weight, "_EXPAND_EXTENSION", extension)
            got[extension] = case()
        assert got[False].abs().max() > 0, name
        torch.testing.assert_close(got[True], got[False], msg=name)


@pytest.mark.parametrize("form", ["fused", "dense", "full", "split"])
def test_eval_mode_gradients_equal_the_training_form(form, tiny_kse, assert_same_function):
    # an eval-mode call that needs gradients (a saliency map, an adversarial input, fine-tuning
    # with BatchNorm frozen) runs the training form: the kernel has no backward, and the
    # prepared weights of the other forms are constants
    net = tiny_kse()
    ref_net = copy.deepcopy(net)
    for m in ref_net.modules():
        if isinstance(m, KSEConv2d):
            m.train()  # the training form, BatchNorm still in eval mode
    kse.deploy_(net, form=form)
    x = torch.randn(3, 1, 16, 16)

    def grads(model):
        xi = x.clone().requires_grad_(True)
        model.zero_grad()
        model(xi).square().sum().backward()
        return xi.grad, [m.centroids.grad for m in model.modules() if isinstance(m, KSEConv2d)]

    calls = []
    kernel = fused.fused_conv
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "fused_conv", lambda *a: calls.append(1) or kernel(*a))
        gx, gc = grads(net)
        assert not calls  # the forward that recorded gradients ran the training form
        with torch.no_grad():  # inference still runs the deployed form
            assert_same_function(net(x), ref_net(x))
        assert bool(calls) == (form == "fused")
    rx, rc = grads(ref_net)
    assert_same_function(gx, rx, 1e-4)
    assert all(g is not None for g in gc)
    for g, r in zip(gc, rc):
        assert_same_function(g, r, 1e-4)
    forms = {m.form for m in net.modules() if isinstance(m, KSEConv2d)}
    assert forms == {form} or (form == "fused" and forms == {"fused", "dense"})  # stride 2: no kernel
    second = []
    for model in (net, ref_net):  # second-order gradients too
        xi = x.clone().requires_grad_(True)
        g, = torch.autograd.grad(model(xi).square().sum(), xi, create_graph=True)
        second.append(torch.autograd.grad(g.square().sum(), xi)[0])
    assert second[1].abs().max() > 0
    assert_same_function(second[0], second[1], 1e-4)


def test_export_records_the_deployed_form():
    layer = KSEConv2d.from_conv(nn.Conv2d(6, 8, 3, padding=1), torch.tensor([0, 3, 8, 2, 5, 1])).eval()
    layer.set_form("full")  # one convolution with the cached weight; the training form pads and gathers
    x = torch.randn(2, 6, 7, 7)
    graph = str(torch.export.export(layer, (x,)).graph)  # grad mode on, parameters requiring gradients
    assert graph.count("aten.conv2d") == 1 and "pad" not in graph and "index_select" not in graph


def test_tracing_an_eval_model_records_the_deployed_form(tiny_kse, assert_same_function):
    net = tiny_kse()
    kse.deploy_(net, form="fused")
    x = torch.randn(2, 1, 16, 16)
    traced = torch.jit.trace(net, x)  # grad mode on, parameters requiring gradients
    assert "kse::fused_conv" in str(traced.inlined_graph)
    with torch.no_grad():
        assert_same_function(traced(x), net(x))


@pytest.mark.parametrize("optimizer", ["sgd_fused", "adam_fused", "sgd_foreach"])
def test_deployed_forms_follow_optimizer_steps(optimizer, tiny_kse, assert_same_function):
    # fused optimizers update parameters without bumping their version counters: the forms
    # prepared for inference are rebuilt when the model goes back to eval mode all the same
    net = tiny_kse()
    kse.deploy_(net, form="fused@1,dense@4")
    params = list(net.parameters())
    opt = {"sgd_fused": lambda: torch.optim.SGD(params, lr=0.05, momentum=0.9, fused=True),
           "adam_fused": lambda: torch.optim.Adam(params, lr=0.01, fused=True),
           "sgd_foreach": lambda: torch.optim.SGD(params, lr=0.05, momentum=0.9, foreach=True)}[optimizer]()
    x = torch.randn(4, 1, 16, 16)
    for _ in range(2):
        net.train()
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
        net.eval()
        with torch.no_grad():
            got1, got4 = net(x[:1]), net(x)
        ref = copy.deepcopy(net)
        for m in ref.modules():
            if isinstance(m, KSEConv2d):
                m.train()  # the training form
        with torch.no_grad():
            want = ref(x)
        assert_same_function(got4, want)
        assert_same_function(got1, want[:1])
    # an inference call between backward and the step keeps the weights of before the step
    # until the model is refreshed (model.eval(), or refresh() on each layer)
    net.train()
    opt.zero_grad()
    net(x).square().mean().backward()
    net.eval()
    with torch.no_grad():
        before = net(x)
    opt.step()
    net.eval()
    ref = copy.deepcopy(net)
    for m in ref.modules():
        if isinstance(m, KSEConv2d):
            m.train()  # the training form
    with torch.no_grad():
        after, want = net(x), ref(x)
    assert not torch.allclose(after, before)
    assert_same_function(after, want)


def test_changing_the_dtype_of_a_fused_model_falls_back_to_a_stock_form(tiny_kse, assert_same_function):
    net = tiny_kse()
    kse.deploy_(net, form="fused")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ref = net(x)
    with pytest.warns(RuntimeWarning, match="fused form needs float32"):
        net.double()
    assert all(p.dtype == torch.float64 for p in net.parameters())  # converted whole
    assert {m.form for m in net.modules() if isinstance(m, KSEConv2d)} == {"dense"}
    with torch.no_grad():
        assert_same_function(net(x.double()).float(), ref)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_paddings_run_in_the_kernel(padding, assert_same_function):
    torch.manual_seed(0)
    layer = KSEConv2d.from_conv(nn.Conv2d(6, 8, 3, padding=padding), torch.tensor([0, 3, 8, 2, 5, 1])).eval()
    assert fused.supports(layer)
    x = torch.randn(2, 6, 7, 9)
    with torch.no_grad():
        ref = layer(x)
        got = layer.set_form("fused")(x)
    assert got.shape == ref.shape == ((2, 8, 7, 9) if padding == "same" else (2, 8, 5, 7))
    assert_same_function(got, ref)
    # an even kernel under "same" pads one side more: not for the kernel, a clear error
    even = KSEConv2d.from_conv(nn.Conv2d(6, 8, 2, padding="same"), torch.tensor([0, 3, 8, 2, 5, 1]))
    assert fused.kernel_padding(even) is None and not fused.supports(even)
    with pytest.raises(ValueError, match="equal padding on both sides"):
        even.set_form("fused")
