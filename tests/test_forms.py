"""kse.forms: every inference form against the slow loop reference; the eval-mode default,
mode switches and refresh; the split form's sparse fusion and the memory estimates."""

import copy
import functools

import pytest
import torch
import torch.nn as nn

import kse
from kse import forms, fused
from kse.conv import KSEConv2d

FORM_NAMES = ["train", "dense", "full", "split", "split-sparse"] + (["fused"] if fused.available() else [])


@pytest.fixture(scope="module")
def make_layer(seeded_conv):
    """``make_layer(...)``: the KSE layer of a seeded conv (random counts unless given, the first
    channel dropped and the last kept)."""
    return functools.partial(_make_layer, seeded_conv)


def _make_layer(seeded_conv, C=6, N=8, k=3, stride=1, padding=1, dilation=1, bias=True, counts=None, seed=0):
    conv, g = seeded_conv(C, N, k, stride, padding, dilation, bias, seed)
    if counts is None:
        counts = torch.randint(0, N + 1, (C,), generator=g)
        counts[0], counts[-1] = 0, max(1, int(counts[-1]))
    return KSEConv2d.from_conv(conv, torch.as_tensor(counts), torch.Generator().manual_seed(seed))


def sparse_fusion(monkeypatch):
    monkeypatch.setattr(forms, "DENSE_FUSION_MAX_RATIO", 0)
    monkeypatch.setattr(forms, "DENSE_FUSION_MAX_ELEMENTS", 0)


@pytest.mark.parametrize("form", FORM_NAMES)
@pytest.mark.parametrize("geometry", [dict(), dict(stride=2, padding=0), dict(k=(3, 1), padding=(1, 0)),
                                      dict(dilation=2, padding=2), dict(padding="same", bias=False)])
@pytest.mark.parametrize("epilogue", [False, True])
def test_every_form_equals_the_reference_forward(form, geometry, epilogue, monkeypatch, reference_forward,
                                             assert_same_function, make_layer):
    if form == "split-sparse":
        sparse_fusion(monkeypatch)
        form = "split"
    layer = make_layer(**geometry).double() if form != "fused" else make_layer(**geometry)
    if form == "fused" and not fused.supports(layer):
        pytest.skip("the kernel runs stride-1, undilated layers")
    g = torch.Generator().manual_seed(1)
    if epilogue:
        layer.set_epilogue(torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g), relu=True)
    x = torch.randn(3, 6, 9, 8, generator=g).to(layer.centroids.dtype)
    run = forms.prepare(layer, form)
    with torch.no_grad():
        want = reference_forward(layer, x)
        assert_same_function(run(x), want)
        assert_same_function(run(x.contiguous(memory_format=torch.channels_last)), want)
        layer.eval().set_form(form)
        assert_same_function(layer(x), want)  # the layer's own eval-mode forward
        assert_same_function(layer(x[1]), want[1])  # one unbatched image [C, H, W], as nn.Conv2d takes


def test_default_form_is_chosen_by_the_share_of_kept_channels(make_layer):
    few = make_layer(C=6, counts=[0, 0, 3, 8, 1, 0])  # 3 of 6 kept
    many = make_layer(C=6, counts=[0, 2, 3, 8, 1, 4])  # 5 of 6 kept
    none = make_layer(C=3, counts=[0, 0, 0])
    assert forms.DEFAULT_GATHER_MAX_KEPT == pytest.approx(2 / 3)
    assert [forms.default_form(m) for m in (few, many, none)] == ["dense", "full", "full"]
    assert few.form == "train" and few.form_for_batch(1) == "dense" and many.form_for_batch(64) == "full"
    assert none.set_form("split").form_for_batch(1) == "full"  # no kept channel: no gather to make


def test_eval_mode_without_gradients_runs_tensors_prepared_once(monkeypatch, assert_same_function, make_layer):
    layer = make_layer()
    x = torch.randn(2, 6, 7, 7)
    prepared = []
    real_prepare = forms.prepare
    monkeypatch.setattr(forms, "prepare", lambda m, f: prepared.append(f) or real_prepare(m, f))
    training_weight = []
    real_weight = KSEConv2d.training_weight
    monkeypatch.setattr(KSEConv2d, "training_weight",
                        lambda self, *a, **k: training_weight.append(1) or real_weight(self, *a, **k))
    assert layer.training and prepared == []  # a new layer trains; nothing prepared
    with torch.no_grad():
        want = layer(x)  # training mode, even without gradients: W' rebuilt
    assert len(training_weight) == 1
    layer.eval()
    assert prepared == ["train"]  # prepared when switching to eval mode ...
    with torch.no_grad():
        for _ in range(3):
            assert_same_function(layer(x), want)
    assert prepared == ["train"] and len(training_weight) == 1  # ... and only then
    y = layer(x)  # eval mode, gradients recorded: the training form
    assert y.requires_grad and len(training_weight) == 2
    with torch.no_grad():
        layer(x)  # prepared again, lazily, after the call with gradients
    assert prepared == ["train", "train"]
    layer.train()
    with torch.no_grad():
        layer(x)
    assert prepared == ["train", "train"] and len(training_weight) == 3
    layer.eval().set_form("split")
    assert prepared[2:] == ["train", "split"]


@pytest.mark.parametrize("channels_last", [False, True])
def test_select_channels_equals_indexing_and_keeps_the_layout(channels_last):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 5, 4, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kept = torch.tensor([0, 2, 3, 6])
    leaf = x.detach().requires_grad_()
    y = forms.select_channels(leaf, kept)
    assert torch.equal(y, x[:, kept]) and forms.is_channels_last(y) == channels_last
    grad = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(grad)
    want = torch.zeros_like(x)
    want[:, kept] = grad
    assert torch.equal(leaf.grad, want)
    assert forms.select_channels(x, None) is x


@pytest.mark.parametrize("form", ["dense", "full"])
def test_the_cached_weight_follows_the_input_layout(form, reference_forward, assert_same_function, make_layer):
    # an nn.Conv2d's weight is channels_last after model.to(memory_format=torch.channels_last);
    # the prepared weight of a KSE layer takes its input's layout the same way (once, not per call)
    layer = make_layer(C=6, N=8, counts=[0, 2, 3, 8, 1, 4]).eval().set_form(form)
    prepared = layer._inference.args[0]
    x = torch.randn(2, 6, 7, 7)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = reference_forward(layer, x)
        assert prepared["weight"].is_contiguous()
        y = layer(x_cl)
        weight = prepared["weight"]
        assert forms.is_channels_last(weight) and forms.is_channels_last(y)
        assert_same_function(y, want)
        layer(x_cl)
        assert prepared["weight"] is weight  # kept, not converted again
        assert_same_function(layer(x), want)
        assert prepared["weight"].is_contiguous() and not forms.is_channels_last(prepared["weight"])


def test_refresh_after_an_in_place_edit_in_eval_mode(reference_forward, assert_same_function, make_layer):
    layer = make_layer().eval()
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        before = layer(x)
        layer.centroids.mul_(-1)
        layer.bias.zero_()
        assert torch.equal(layer(x), before)  # the prepared tensors do not see in-place edits ...
        layer.refresh()
        after = layer(x)
    assert_same_function(after, reference_forward(layer, x))  # ... until refresh()
    assert not torch.allclose(after, before)


def test_device_and_dtype_moves_rebuild_the_prepared_tensors(reference_forward, assert_same_function, make_layer):
    layer = make_layer().eval().set_form("dense@1,split@4")
    x = torch.randn(5, 6, 7, 7, dtype=torch.float64)
    layer.double()
    with torch.no_grad():
        for b in (1, 5):
            got = layer(x[:b])
            assert got.dtype == torch.float64
            assert_same_function(got, reference_forward(layer, x[:b]))


def test_split_fusion_is_sparse_where_a_dense_matrix_would_be_large(assert_same_function, make_layer):
    # a 1x1 layer whose channels keep every kernel: M = C * N centroids, a dense fusion matrix
    # would have N * M = C * N^2 elements, the sparse one has N * C ones
    C, N = 64, 128
    wide = make_layer(C=C, N=N, k=1, padding=0, counts=torch.full((C,), N))
    t = forms.prepare_split(wide)
    assert t["fusion"].layout == torch.sparse_csr and t["fusion"].shape == (N, C * N)
    assert t["fusion"]._nnz() == N * C
    small = forms.prepare_split(make_layer())
    assert small["fusion"].layout == torch.strided
    x = torch.randn(2, C, 3, 3)
    with torch.no_grad():
        assert_same_function(forms.run_split(t, x), wide.to_conv()(x))


@pytest.mark.parametrize("form", ["dense", "full", "split", "split-sparse"] + (["fused"] if fused.available() else []))
def test_memory_estimate_covers_the_prepared_tensors(form, monkeypatch, make_layer):
    if form == "split-sparse":
        sparse_fusion(monkeypatch)
        form = "split"
    layer = make_layer(C=16, N=32, counts=torch.randint(1, 33, (16,), generator=torch.Generator().manual_seed(2)))

    def nbytes(obj):
        if torch.is_tensor(obj):
            if obj.layout == torch.sparse_csr:
                return sum(nbytes(t) for t in (obj.crow_indices(), obj.col_indices(), obj.values()))
            return obj.numel() * obj.element_size()
        if isinstance(obj, (list, tuple)):
            return sum(nbytes(o) for o in obj)
        if isinstance(obj, dict):
            return sum(nbytes(o) for o in obj.values())
        return 0

    shape = (2, 16, 9, 9)
    prepared = forms.REGISTRY[form].prepare(layer)
    estimate = forms.REGISTRY[form].memory(layer, shape)
    with torch.no_grad():
        out = forms.REGISTRY[form].run(prepared, torch.randn(shape))
    assert nbytes(prepared) + nbytes(out) <= estimate


def test_forms_errors(make_layer):
    layer = make_layer(stride=2, padding=0)
    with pytest.raises(ValueError, match="fused form needs stride 1"):
        layer.set_form("fused")
    assert layer.form == "train"  # unchanged
    with pytest.raises(ValueError, match="form must be one of"):
        forms.prepare(layer, "sparse")
    with pytest.raises(ValueError, match="each part must be an inference form"):
        layer.set_form("train@1,dense@4")


def test_a_loaded_model_in_eval_mode_runs_prepared_tensors(tmp_path, monkeypatch, assert_same_function):
    net = kse.compress(kse.models.get_model("resnet20", num_classes=10, in_channels=1).eval(),
                       kse.KSEConfig(G=4, input_size=(1, 16, 16)))
    kse.save(net, tmp_path / "net.kse")
    reference = copy.deepcopy(net)
    for m in reference.modules():
        if isinstance(m, KSEConv2d):
            m.train()  # the training form (BatchNorm in eval mode)
    loaded = kse.load(tmp_path / "net.kse")
    assert not loaded.training
    layers = [m for m in loaded.modules() if isinstance(m, KSEConv2d)]
    assert {m.form for m in layers} == {"train"}  # not deployed
    monkeypatch.setattr(KSEConv2d, "training_weight", lambda *a, **k: pytest.fail("W' rebuilt in eval mode"))
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        got = loaded(x)
    monkeypatch.undo()
    with torch.no_grad():
        assert_same_function(got, reference(x))
