"""kse.explain / kse.ablation: the fast exact ablation against a slow loop, the Taylor estimate
against autograd, the rank statistics against scipy, the channel-dropping experiment against
kse.compress, the report files, and the errors."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import kse
from kse.ablation import ablation_importance, ablation_importance_hooks, taylor_importance
from kse.explain import (LayerExplanation, agreement, counts_by_score, drop_experiment, explain, match_layers,
                         producer_convs, rank_rows, resampled_ranks, spearman, spearman_rows)
from kse.explain import _with_counts

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return _randomise_bn(kse.models.get_model("resnet20", num_classes=10))


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 3, 12, 12, generator=g), torch.randint(0, 10, (10,), generator=g)


# a layer inside a block, the first conv of a stride-2 block (its input also feeds the shortcut),
# the first conv of an identity block (same), the last conv
LAYERS = ["layer1.0.conv2", "layer2.0.conv1", "layer3.1.conv1", "layer3.2.conv2"]


# ----------------------------------------------------------------------------- exact ablation
@pytest.fixture(scope="module")
def reference(net, batch):
    return ablation_importance_hooks(net, LAYERS, *batch)


@pytest.mark.parametrize("rows", [1, 7, 64, 4096])
def test_fast_ablation_equals_slow_loop(net, batch, reference, rows):
    fast = ablation_importance(net, LAYERS, *batch, rows=rows, method="fx")
    for name in LAYERS:
        torch.testing.assert_close(fast[name].loss_increase, reference[name].loss_increase, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(fast[name].top1_drop, reference[name].top1_drop)
        torch.testing.assert_close(fast[name].loss_increase_halves, reference[name].loss_increase_halves,
                                   atol=4e-5, rtol=1e-4)
        assert fast[name].base_loss == pytest.approx(reference[name].base_loss, rel=1e-5)
    assert any(reference[n].loss_increase.abs().max() > 1e-2 for n in LAYERS)  # not all zero


def test_halves_are_the_even_and_odd_images(net, batch, reference):
    x, y = batch
    name = "layer3.1.conv1"
    even = ablation_importance_hooks(net, [name], x[0::2], y[0::2])[name]
    odd = ablation_importance_hooks(net, [name], x[1::2], y[1::2])[name]
    halves = reference[name].loss_increase_halves
    torch.testing.assert_close(halves[0], even.loss_increase, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(halves[1], odd.loss_increase, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(halves.mean(0), reference[name].loss_increase)  # 5 + 5 images


def test_layers_on_two_workers_give_the_same_numbers(net, batch, reference):
    two = ablation_importance(net, LAYERS, *batch, rows=32, workers=2)
    one = ablation_importance(net, LAYERS, *batch, rows=32, workers=1)
    for name in LAYERS:
        torch.testing.assert_close(two[name].loss_increase, one[name].loss_increase, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(two[name].loss_increase, reference[name].loss_increase, atol=2e-5, rtol=1e-4)
    assert torch.get_num_threads() == 1  # restored
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        ablation_importance(net, LAYERS, *batch, workers=0)


def test_ablation_zeroes_the_map_for_the_layer_only(net, batch, reference):
    """Zeroing the block input for the whole network (shortcut included) is another, larger change."""
    x, y = batch
    conv = net.get_submodule("layer2.0")

    def zero_everywhere(mod, args):
        z = args[0].clone()
        z[:, 0] = 0
        return (z,)

    h = conv.register_forward_pre_hook(zero_everywhere)
    try:
        with torch.no_grad():
            loss = F.cross_entropy(net(x), y).item()
    finally:
        h.remove()
    both = loss - reference["layer2.0.conv1"].base_loss
    assert abs(both - reference["layer2.0.conv1"].loss_increase[0].item()) > 1e-4


class SizeReader(nn.Module):
    """Reads the batch size before the explained layer and uses it after (x.size(0) -> view)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 4)

    def forward(self, x):
        n = x.size(0)
        h = F.relu(self.a(x))
        h = F.relu(self.b(h)) + h[:, :5]
        return self.fc(F.avg_pool2d(h, 2).reshape(n, -1))


class Untraceable(SizeReader):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 1.0
        return super().forward(x)


def test_fast_ablation_recomputes_batch_sizes_read_before_the_layer():
    torch.manual_seed(2)
    model = SizeReader().eval()
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    fast = ablation_importance(model, ["b"], x, y, rows=12, method="fx")
    slow = ablation_importance_hooks(model, ["b"], x, y)
    torch.testing.assert_close(fast["b"].loss_increase, slow["b"].loss_increase, atol=1e-5, rtol=1e-4)


def test_untraceable_model_falls_back_to_the_loop():
    torch.manual_seed(3)
    model = Untraceable().eval()
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))
    with pytest.warns(RuntimeWarning, match="cannot trace"):
        auto = ablation_importance(model, ["b"], x, y)
    slow = ablation_importance_hooks(model, ["b"], x, y)
    torch.testing.assert_close(auto["b"].loss_increase, slow["b"].loss_increase)
    with pytest.raises(ValueError, match="cannot trace"):
        ablation_importance(model, ["b"], x, y, method="fx")


def test_ablation_leaves_the_model_as_it_was(net, batch):
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ablation_importance(net, ["layer3.2.conv2"], *batch)
    assert net.training
    net.eval()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- Taylor
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = F.relu(self.b(h)) + h  # the shortcut reads b's input too
        return self.fc(h.mean((2, 3)))


def test_taylor_matches_autograd_per_image():
    torch.manual_seed(4)
    model = Tiny().double().eval()
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    got = taylor_importance(model, ["b"], x, y, batch_size=2)["b"]
    ref_taylor, ref_act = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for i in range(5):
        h = F.relu(model.a(x[i:i + 1]))
        read = h.detach().requires_grad_(True)  # b's own use of h; the shortcut gets h itself
        out = model.fc((F.relu(model.b(read)) + h.detach()).mean((2, 3)))
        (g,) = torch.autograd.grad(F.cross_entropy(out, y[i:i + 1]), read)
        ref_taylor += (h.detach() * g).sum((2, 3)).abs()[0]
        ref_act += h.detach().abs().mean((2, 3))[0]
    torch.testing.assert_close(got["taylor"], ref_taylor / 5)
    torch.testing.assert_close(got["activation"], ref_act / 5)
    assert all(p.grad is None for p in model.parameters())


def test_taylor_is_first_order_ablation_for_a_small_map():
    """Scaled down, the Taylor estimate and the exact loss change of one image agree."""
    torch.manual_seed(5)
    model = Tiny().double().eval()
    x, y = torch.randn(1, 2, 6, 6, dtype=torch.float64), torch.tensor([2])
    with torch.no_grad():
        model.a.weight.mul_(1e-3)
        model.a.bias.mul_(1e-3)
    t = taylor_importance(model, ["b"], x, y)["b"]["taylor"]
    exact = ablation_importance_hooks(model, ["b"], x, y)["b"].loss_increase.abs()
    torch.testing.assert_close(t, exact, rtol=1e-2, atol=1e-9)


# ----------------------------------------------------------------------------- statistics
def test_ranks_and_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = np.round(rng.random((30, 17)) * 5)  # many ties
    b = rng.random((30, 17))
    np.testing.assert_allclose(rank_rows(a), stats.rankdata(a, axis=1))
    ref = [stats.spearmanr(a[i], b[i]).statistic for i in range(30)]
    np.testing.assert_allclose(spearman_rows(a, b), ref, atol=1e-12)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)


def test_resampled_ranks_equal_sorting_each_resample():
    rng = np.random.default_rng(1)
    x = np.round(rng.random(40) * 6)
    draw = rng.integers(0, 40, size=(50, 40))
    np.testing.assert_allclose(resampled_ranks(x, draw), rank_rows(x[draw]))


def _layers(n_layers=3, channels=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_layers):
        imp = torch.rand(channels, generator=g, dtype=torch.float64)
        scores = {k: torch.rand(channels, generator=g, dtype=torch.float64)
                  for k in ("sparsity", "entropy", "taylor", "activation", "random", "top1_drop")}
        scores.update(kse=imp * 3 + 1, loss_increase=imp, counts=torch.zeros(channels, dtype=torch.float64),
                      producer_l1=torch.full((channels,), float("nan")) if i == 0 else imp.clone())
        out.append(LayerExplanation(f"l{i}", channels, 8, scores))
    return out


def test_agreement_perfect_score_random_score_and_undefined_layers():
    layers = _layers()
    ag = agreement(layers, resamples=200, seed=3)
    assert ag["kse"]["pooled"]["rho"] == pytest.approx(1.0)
    assert ag["kse"]["mean_within_layer"]["rho"] == pytest.approx(1.0)
    assert ag["kse"]["pooled"]["ci95"] == [1.0, 1.0]
    assert ag["producer_l1"]["per_layer"]["l0"]["rho"] is None  # undefined there
    assert ag["producer_l1"]["mean_within_layer"]["layers"] == 2
    assert ag["producer_l1"]["pooled"]["channels"] == 40
    lo, hi = ag["random"]["pooled"]["ci95"]
    assert lo < ag["random"]["pooled"]["rho"] < hi
    assert agreement(layers, resamples=200, seed=3) == ag  # fixed seed: the same intervals
    with pytest.raises(ValueError, match="resamples must be an integer >= 1"):
        agreement(layers, resamples=0)


def test_entropy_alone_ranks_low_entropy_first():
    layers = _layers(1)
    layers[0].scores["entropy"] = -layers[0].scores["loss_increase"]  # high entropy = unimportant
    assert agreement(layers, ["entropy"], resamples=10)["entropy"]["pooled"]["rho"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- dropping channels
def test_counts_by_score_gives_kse_its_own_counts_back():
    w = torch.randn(16, 12, 3, 3)
    v = kse.kse_indicator(w)
    q = kse.centroid_counts(v, 16, G=4)
    assert torch.equal(counts_by_score(q, v), q)
    flipped = counts_by_score(q, -v)
    assert torch.equal(torch.sort(flipped).values, torch.sort(q).values)
    assert flipped[torch.argmax(v)] == 0  # the strongest channel by v is the weakest by -v
    with pytest.raises(ValueError, match="same shape"):
        counts_by_score(q, v[:3])


def test_kse_row_is_the_model_kse_compress_builds(net):
    cfg = kse.KSEConfig(G=4, remove_dead_channels=False, input_size=(3, 12, 12))
    plans = kse.plan(net, cfg, torch.randn(2, 3, 12, 12))
    ours = _with_counts(net, plans, {p.name: p.counts for p in plans}, cfg)
    theirs = kse.compress(net, cfg).eval()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-4)


def test_drop_experiment_rows(net, batch):
    cfg = kse.KSEConfig(G=4, input_size=(3, 12, 12))
    result = explain(net, *batch, layers=["layer3.*"], config=cfg, resamples=20)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 12, 12, generator=g), torch.randint(0, 10, (16,), generator=g))
    plans = kse.plan(net, kse.KSEConfig(G=4, include=["layer3.*"]), batch[0][:2])
    drop = drop_experiment(net, result.layers, plans, cfg, DataLoader(data, batch_size=8),
                           DataLoader(data, batch_size=8), recal_batches=2, scores=("kse", "random", "ablation"))
    parallel = drop_experiment(net, result.layers, plans, cfg, DataLoader(data, batch_size=8),
                               DataLoader(data, batch_size=8), recal_batches=2, scores=("kse", "random", "ablation"),
                               workers=2)
    assert parallel == drop
    kse_dropped = sum(int((p.counts == 0).sum()) for p in plans)
    dropped_only = copy.deepcopy(net)
    with torch.no_grad():
        for p in plans:
            dropped_only.get_submodule(p.name).weight[:, p.counts == 0] = 0
        top1 = 100 * float((dropped_only(data.tensors[0]).argmax(1) == data.tensors[1]).double().mean())
    assert drop["rows"]["kse"]["top1_dropped_only"] == pytest.approx(top1, abs=1e-3)
    for row in drop["rows"].values():
        assert row["dropped"] == kse_dropped
        assert row["centroids"] == sum(int(p.counts.sum()) for p in plans)
        assert 0 <= row["top1"] <= 100 and 0 <= row["top1_recalibrated"] <= 100
    assert drop["rows"]["kse"]["same_as_kse"] == len(plans)
    assert drop["recal_batches"] == 2


# ----------------------------------------------------------------------------- whole run, report
def test_producer_convs_of_a_resnet(net):
    found = producer_convs(net, ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer2.0.conv2"])
    assert found == {"layer1.0.conv1": "conv1", "layer1.0.conv2": "layer1.0.conv1", "layer1.1.conv1": None,
                     "layer2.0.conv2": "layer2.0.conv1"}


def test_explain_end_to_end_and_report(net, batch, tmp_path):
    from kse.explain_plots import write_report

    x, y = batch
    data = TensorDataset(x, y)
    result = explain(net, x, y, layers=["layer2.*", "layer3.0.conv1"],
                     config=kse.KSEConfig(G=4, input_size=(3, 12, 12)), eval_loader=DataLoader(data, batch_size=5),
                     recal_loader=DataLoader(data, batch_size=5), recal_batches=2, resamples=50,
                     show_layer="layer2.1.conv1", show_images=2, drop_scores=("kse", "random"))
    names = [l.name for l in result.layers]
    assert names == [f"layer2.{b}.conv{c}" for b in range(3) for c in (1, 2)] + ["layer3.0.conv1"]
    layer = result.layer("layer2.1.conv1")
    assert layer.producer is None and result.layer("layer2.1.conv2").producer == "layer2.1.conv1"
    assert set(layer.scores) >= {"sparsity", "entropy", "kse", "counts", "producer_l1", "loss_increase",
                                 "top1_drop", "taylor", "activation", "random"}
    torch.testing.assert_close(layer.scores["sparsity"], kse.kernel_sparsity(net.get_submodule(layer.name).weight).double())
    assert result.feature_maps["maps"].shape == (2, 32, 6, 6)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["layers"][0]["name"] == "layer2.0.conv1" and len(data["layers"][0]["kse"]) == 16
    assert data["layers"][2]["producer_l1"][0] is None  # NaN -> null
    assert data["split_half"]["mean_within_layer"]["layers"] == 7
    assert len(data["layers"][0]["loss_increase_even"]) == 16
    assert set(data["agreement"]) == {"kse", "sparsity", "entropy", "producer_l1", "taylor", "activation", "random"}
    files = write_report(result, tmp_path / "rep", command="kse explain ...")
    assert {f.name for f in files} == {"feature_maps.png", "scatter.png", "agreement.png", "kernels_layer2.png",
                                       "kernels_layer3.png", "explain.json", "report.md"}
    for f in files:
        assert f.stat().st_size > 200
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "| KSE indicator v |" in report and "Does it pick the right channels?" in report
    assert json.loads((tmp_path / "rep" / "explain.json").read_text())["settings"]["images"] == 10


def test_errors(net, batch):
    x, y = batch
    with pytest.raises(ValueError, match="no layer matches \\['nothing.\\*'\\]"):
        explain(net, x, y, layers=["nothing.*"])
    with pytest.raises(ValueError, match="non-empty Tensor"):
        explain(net, x[:0], y[:0])
    with pytest.raises(ValueError, match="show_layer 'fc'"):
        explain(net, x, y, layers=["layer3.2.conv2"], show_layer="fc")
    with pytest.raises(ValueError, match="labels must be a Tensor\\[10\\]"):
        ablation_importance(net, ["layer3.2.conv2"], x, y[:3])
    with pytest.raises(ValueError, match="method must be"):
        ablation_importance(net, ["layer3.2.conv2"], x, y, method="fast")
    with pytest.raises(ValueError, match="rows must be an integer >= 1"):
        ablation_importance(net, ["layer3.2.conv2"], x, y, rows=0)
    with pytest.raises(ValueError, match="layer 'nope' is not in the model"):
        ablation_importance(net, ["nope"], x, y)
    with pytest.raises(TypeError, match="must be an nn.Conv2d"):
        taylor_importance(net, ["fc"], x, y)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        taylor_importance(net, ["layer3.2.conv2"], x, y, batch_size=0)
    assert match_layers(net, None, kse.KSEConfig())[0] == "layer1.0.conv1"  # the first conv is not KSE's


# ----------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def fake_checkpoint(tmp_path_factory):
    from kse.data import dataset_info

    torch.manual_seed(6)
    model = _randomise_bn(kse.models.get_model("resnet20", num_classes=10))
    info = dataset_info("fake")
    pre = {**info.preprocess(), "input_size": [3, 16, 16]}
    path = tmp_path_factory.mktemp("explain") / "fake.kse"
    kse.save(model, path, preprocess=pre)
    return path


FAST = ["--layers", "layer3.*", "--fake-size", 64, "--images", 8, "--eval-images", 8, "--recal-batches", 2,
        "--batch-size", 8, "--bootstrap", 50, "--device", "cpu"]


def test_cli_explain_on_fakedata(fake_checkpoint, tmp_path, ok):
    out, err = ok(["explain", "--checkpoint", fake_checkpoint, *FAST, "--out", tmp_path / "rep", "--json"])
    data = json.loads(out)  # one object
    assert [l["name"] for l in data["layers"]] == [f"layer3.{b}.conv{c}" for b in range(3) for c in (1, 2)]
    assert len(data["layers"][0]["loss_increase"]) == 32 and len(data["layers"][1]["taylor"]) == 64
    assert data["settings"]["images"] == 8 and data["run"]["eval_images"] == 8
    assert set(data["drop"]["rows"]) == {"kse", "sparsity", "entropy", "producer_l1", "random", "ablation"}
    assert data["agreement"]["kse"]["pooled"]["channels"] == 352
    assert "ablation [" in err and "%" in err  # progress on stderr
    files = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"report.md", "explain.json", "args.json", "feature_maps.png", "scatter.png", "agreement.png",
            "kernels_layer3.png"} <= files
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "kse explain --checkpoint" in report and "--images 8" in report


def test_cli_explain_same_images_by_default_others_with_seed(fake_checkpoint, ok):
    runs = [json.loads(ok(["explain", "--checkpoint", fake_checkpoint, *FAST, "--no-drop", "--json", *extra])[0])
            for extra in ([], [], ["--seed", 3])]
    first = [l["loss_increase"] for l in runs[0]["layers"]]
    assert first == [l["loss_increase"] for l in runs[1]["layers"]]
    assert first != [l["loss_increase"] for l in runs[2]["layers"]]
    assert runs[0]["drop"] is None


@pytest.mark.parametrize("argv, message", [
    (["--images", 0], "--images must be >= 1"),
    (["--images", 100000], "100000 images asked for, the split has 16"),
    (["--layers", "nothing.*"], "no layer matches \\['nothing.\\*'\\]"),
    (["--show-layer", "fc"], "--show-layer .fc. is not among"),
    (["--recal-batches", 50], "needs 400 training images, fake has 64"),
])
def test_cli_explain_bad_arguments(fake_checkpoint, argv, message, one_error_line):
    import re

    base = ["explain", "--checkpoint", fake_checkpoint, "--fake-size", 64, "--layers", "layer3.2.*", "--images", 4,
            "--batch-size", 8, "--eval-images", 4, "--device", "cpu"]
    line = one_error_line(base + argv)
    assert re.search(message, line), line


def test_cli_explain_missing_dataset(fake_checkpoint, tmp_path, one_error_line):
    line = one_error_line(["explain", "--checkpoint", fake_checkpoint, "--dataset", "cifar10", "--data-dir", tmp_path,
                           "--images", 4])
    assert "cifar10 not found" in line
    line = one_error_line(["explain", "--checkpoint", tmp_path / "none.kse"])
    assert "file not found" in line
