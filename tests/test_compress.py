"""compress_ / compress: layer selection, dead-channel removal, atomicity, errors."""

import copy
import importlib

import pytest
import torch
import torch.nn as nn
import torchvision

import kse
from kse.conv import KSEConv2d
from kse.models import get_model

compress_mod = importlib.import_module("kse.compress")  # the module, not the function kse.compress


def n_kse(model):
    return sum(isinstance(m, KSEConv2d) for m in model.modules())


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_compress_resnet20_runs_trains_and_skips_first_conv():
    net = get_model("resnet20", num_classes=10)
    kse.compress_(net, kse.KSEConfig(G=4, input_size=(3, 32, 32)))
    assert type(net.conv1) is nn.Conv2d  # the stem is skipped
    assert n_kse(net) == 18
    assert net.kse_config["G"] == 4
    net.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = net.layer1[0].conv2.centroids.detach().clone()
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    assert not torch.equal(before, net.layer1[0].conv2.centroids)


def test_compress_copy_leaves_original_and_never_compresses_twice():
    net = get_model("resnet20")
    state = copy.deepcopy(net.state_dict())
    small = kse.compress(net, kse.KSEConfig(G=4, input_size=(3, 32, 32)))
    assert n_kse(small) == 18 and n_kse(net) == 0
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    # only plain nn.Conv2d layers are chosen: a second pass finds nothing new
    with pytest.raises(ValueError, match="no eligible convolution"):
        kse.compress_(small, kse.KSEConfig(G=4, skip_first=False, exclude=["conv1"]))


def test_layer_selection_include_exclude_filter():
    net = get_model("resnet20")
    plans = kse.plan(net, kse.KSEConfig(include=["layer1.*"], exclude=["*.conv2"]))
    assert [p.name for p in plans] == ["layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1"]
    plans = kse.plan(net, kse.KSEConfig(filter_fn=lambda m, name: m.out_channels == 64))
    assert len(plans) == 6  # the six convs of layer3
    assert all(net.get_submodule(p.name).out_channels == 64 for p in plans)


def test_depthwise_skipped_and_grouped_model():
    net = torchvision.models.mobilenet_v2(num_classes=10)
    plans = kse.plan(net, kse.KSEConfig())
    assert plans and all(net.get_submodule(p.name).groups == 1 for p in plans)
    assert "features.0.0" not in {p.name for p in plans}  # the stem


def _removed_exactly_and_aligned(net, cfg, kept, x):
    """Compress with every dead channel removed and with widths aligned to 8 (the default); both
    give ``kept``'s outputs, and the aligned widths are the exact ones rounded up. Returns the former."""
    removed = kse.compress(net, kse.KSEConfig(**cfg, channel_multiple=1))
    torch.testing.assert_close(outputs(removed, x), outputs(kept, x), rtol=1e-5, atol=1e-5)
    aligned = kse.compress(net, kse.KSEConfig(**cfg))
    torch.testing.assert_close(outputs(aligned, x), outputs(kept, x), rtol=1e-5, atol=1e-5)
    widths = [m.out_channels for m in aligned.modules() if isinstance(m, (torch.nn.Conv2d, KSEConv2d))][1:]
    assert all(w % 8 == 0 for w in widths)
    exact = [m.out_channels for m in removed.modules() if isinstance(m, (torch.nn.Conv2d, KSEConv2d))][1:]
    assert any(w % 8 for w in exact)  # without alignment some widths are odd ...
    assert [w + (-w) % 8 for w in exact] == widths  # ... and the aligned ones are those rounded up
    return removed


def test_dead_channels_really_removed_on_resnet56():
    torch.manual_seed(0)
    net = get_model("resnet56").eval()
    x = torch.randn(3, 3, 32, 32)
    cfg = dict(G=4, seed=3, input_size=(3, 32, 32))
    kept = kse.compress(net, kse.KSEConfig(**cfg, remove_dead_channels=False))
    removed = _removed_exactly_and_aligned(net, cfg, kept, x)
    # every block's conv1 lost the channels its conv2 dropped
    block = removed.layer2[3]
    assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels
    assert block.conv1.out_channels < 32
    assert sum(p.numel() for p in removed.parameters()) < sum(p.numel() for p in kept.parameters())
    # residual stream channels feed the classifier: never removed
    assert all(b.conv2.out_channels == b.bn2.num_features for s in (removed.layer1, removed.layer2, removed.layer3) for b in s)
    assert removed.layer3[8].bn2.num_features == 64


@pytest.mark.parametrize("builder,size", [(torchvision.models.resnet50, 64), (torchvision.models.densenet121, 64)])
def test_dead_channel_removal_changes_no_output_torchvision(builder, size):
    torch.manual_seed(0)
    net = builder(num_classes=10).eval()
    # trained-like BN statistics so that every channel matters
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, size, size)
    cfg = dict(G=5, T=1, seed=1, input_size=(3, size, size), kmeans_iters=10)
    kept = kse.compress(net, kse.KSEConfig(**cfg, remove_dead_channels=False))
    removed = _removed_exactly_and_aligned(net, cfg, kept, x)
    n_kept = sum(p.numel() for p in kept.parameters())
    n_removed = sum(p.numel() for p in removed.parameters())
    if builder is torchvision.models.resnet50:
        assert n_removed < n_kept  # bottleneck conv1/conv2 outputs are read by one conv each
    else:
        assert n_removed <= n_kept


def test_failed_compress_leaves_model_unchanged(monkeypatch):
    net = get_model("resnet20").eval()
    state = copy.deepcopy(net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    y = outputs(net, x)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(compress_mod, "find_dead_channels", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        kse.compress_(net, kse.KSEConfig(input_size=(3, 32, 32)))
    assert n_kse(net) == 0 and net.state_dict().keys() == state.keys()
    torch.testing.assert_close(outputs(net, x), y)

    monkeypatch.undo()
    with torch.no_grad():
        net.layer3[2].conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 'layer3.2.conv2': .*NaN or Inf"):
        kse.compress_(net, kse.KSEConfig(input_size=(3, 32, 32)))
    assert n_kse(net) == 0


@pytest.mark.parametrize("fail_at", [10, 25])  # in the first swap loop, and in the removal loop
def test_swap_failure_is_rolled_back(monkeypatch, fail_at):
    net = get_model("resnet20").eval()
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    calls = {"n": 0}
    real = compress_mod.set_module

    def flaky(model, name, module):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("swap failed")
        real(model, name, module)

    monkeypatch.setattr(compress_mod, "set_module", flaky)
    with pytest.raises(RuntimeError, match="swap failed"):  # every dead channel removed: more swaps
        kse.compress_(net, kse.KSEConfig(input_size=(3, 32, 32), channel_multiple=1))
    assert calls["n"] >= fail_at
    assert n_kse(net) == 0
    assert {k: v.shape for k, v in net.state_dict().items()} == shapes


@pytest.mark.parametrize("kwargs,match", [
    (dict(G=1), "G must be an integer >= 2, got 1"),
    (dict(G=2.5), "G must be an integer >= 2, got 2.5"),
    (dict(T=-1), "T must be an integer >= 0, got -1"),
    (dict(T=10**30), "T must be an integer <= 1048576, got 10{30}"),  # was accepted, then an OverflowError
    (dict(G=2**70), "G must be an integer <= 1048576, got 1180591620717411303424"),
    (dict(alpha=-0.5), "alpha must be a finite number >= 0, got -0.5"),
    (dict(k=0), "k must be an integer >= 1, got 0"),
    (dict(input_size=(3, 32)), "input_size must be"),
    (dict(channel_multiple=0), "channel_multiple must be an integer >= 1, got 0"),
    (dict(score="l1"), "score must be one of 'kse', 'sparsity', 'entropy', got 'l1'"),
    (dict(entropy_layout="bug"), "entropy_layout must be one of 'paper', 'official', got 'bug'"),
    (dict(skip_first="no"), "skip_first must be true or false, got 'no'"),
    (dict(remove_dead_channels=0), "remove_dead_channels must be true or false, got 0"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kse.KSEConfig(**kwargs)


def test_config_round_trip_and_unknown_keys():
    cfg = kse.KSEConfig(G=5, T=1, exclude=["fc"], input_size=(3, 224, 224))
    assert kse.KSEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown KSEConfig keys"):
        kse.KSEConfig.from_dict({"G": 4, "groups": 2})


def test_model_without_eligible_conv():
    with pytest.raises(ValueError, match="no eligible convolution"):
        kse.compress_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), kse.KSEConfig())
    with pytest.raises(TypeError, match="kse.KSEConfig"):
        kse.compress_(get_model("resnet20"), {"G": 4})


def test_model_whose_output_is_a_conv():
    """Channels that are the network's output are never dead, even with no reader."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 5, 1)).eval()
    x = torch.randn(2, 3, 12, 12)
    kept = kse.compress(net, kse.KSEConfig(input_size=(3, 12, 12), remove_dead_channels=False))
    removed = kse.compress(net, kse.KSEConfig(input_size=(3, 12, 12), channel_multiple=1))
    assert removed[5].out_channels == 5
    torch.testing.assert_close(outputs(removed, x), outputs(kept, x))
    assert removed[2].out_channels < 16  # conv 2's outputs are only read by conv 5, which drops some


def test_modes_and_random_stream_are_preserved():
    net = get_model("resnet20")
    net.train()
    net.layer1[0].bn1.eval()  # a frozen BatchNorm inside a training model
    torch.manual_seed(123)
    kse.compress_(net, kse.KSEConfig(input_size=(3, 32, 32)))
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))  # compress_ did not consume the global RNG
    kse.profile(net, (3, 32, 32))
    assert net.training and net.layer2[0].bn1.training and not net.layer1[0].bn1.training


def test_failing_example_input_is_one_clear_error():
    with pytest.raises(ValueError, match=r"does not run on an example input of shape \(2, 3, 0, 5\)"):
        kse.compress_(get_model("resnet20"), kse.KSEConfig(input_size=(3, 5, 5)), example_inputs=torch.randn(2, 3, 5, 5)[:, :, :0])


def test_compression_is_deterministic_for_a_seed():
    threads = torch.get_num_threads()
    net = get_model("resnet20").eval()
    a = kse.compress(net, kse.KSEConfig(seed=4, input_size=(3, 32, 32)))
    b = kse.compress(net, kse.KSEConfig(seed=4, input_size=(3, 32, 32)))
    c = kse.compress(net, kse.KSEConfig(seed=5, input_size=(3, 32, 32)))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if k.endswith("centroids"))
    assert torch.get_num_threads() == threads  # the worker pool gave the thread count back


def test_a_graph_torch_pruning_cannot_map_keeps_its_channels_with_a_warning(monkeypatch):
    # Torch-Pruning 1.6 raises ZeroDivisionError on torchvision's ShuffleNetV2 (channel shuffle);
    # compression must go on without removing dead channels, and say why
    import torch_pruning as tp

    def fails(self, *args, **kwargs):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", fails)
    torch.manual_seed(0)
    net = get_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    cfg = kse.KSEConfig(G=4, seed=1, input_size=(3, 32, 32))
    with pytest.warns(RuntimeWarning, match="dead channels not removed.*ZeroDivisionError"):
        got = kse.compress(net, cfg)
    monkeypatch.undo()
    ref = kse.compress(net, kse.KSEConfig(G=4, seed=1, input_size=(3, 32, 32), remove_dead_channels=False))
    torch.testing.assert_close(outputs(got, x), outputs(ref, x))
    assert [m.in_channels for m in got.modules() if isinstance(m, nn.Conv2d | KSEConv2d)] == \
        [m.in_channels for m in ref.modules() if isinstance(m, nn.Conv2d | KSEConv2d)]


def test_shufflenet_v2_compresses():
    torch.manual_seed(0)
    net = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # dead channels, if Torch-Pruning cannot map the shuffle
        c = kse.compress(net, kse.KSEConfig(G=4, input_size=(3, 32, 32)))
    assert n_kse(c) > 10
    assert torch.isfinite(outputs(c, x)).all()


def test_a_meta_device_model_is_a_clear_error(tmp_path):
    """A model built under torch.device('meta') has shapes but no values (was a raw torch error)."""
    from kse.models import get_model

    with torch.device("meta"):
        net = get_model("resnet20")
    with pytest.raises(ValueError, match="cannot compress a model on the meta device \\(conv1.weight has no values\\)"):
        kse.compress_(net, kse.KSEConfig(input_size=(3, 32, 32)))
    with pytest.raises(ValueError, match="cannot save a model on the meta device"):
        kse.save(net, tmp_path / "m.kse")
    with pytest.raises(ValueError, match="weight is on the meta device"):
        kse.kse_indicator(torch.empty(8, 4, 3, 3, device="meta"))
    assert not list(tmp_path.iterdir())
