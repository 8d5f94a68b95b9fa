"""L1-norm filter pruning (the peer baseline): filter choice, exact surgery, MAC matching, files."""

from __future__ import annotations

import copy

import pytest
import torch

import kse
from kse.filter_prune import l1_filter_norms, l1_prune_, prune_to_macs, select_prunable, tp_global_prune_
from kse.models import get_model

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread for the module

X = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))




def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = get_model("resnet20", num_classes=10, in_channels=1)
    for m in net.modules():  # non-trivial BatchNorm statistics, so the surgery is really checked
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def test_l1_norms_known_answer():
    w = torch.zeros(3, 2, 1, 2)
    w[0] = torch.tensor([[[1.0, -2.0]], [[0.5, 0.0]]])
    w[2] = -1.0
    assert l1_filter_norms(w).tolist() == [3.5, 0.0, 4.0]
    with pytest.raises(ValueError, match="expected a conv weight"):
        l1_filter_norms(torch.zeros(3, 3))


def test_prune_removes_smallest_filters_and_equals_zeroed_reference():
    net = _net()
    conv = net.layer2[1].conv1
    scale = torch.ones(conv.out_channels)
    scale[[3, 7, 11]] = 1e-3  # the three weakest filters
    conv.weight.data *= scale.view(-1, 1, 1, 1)
    ref = copy.deepcopy(net)
    removed = l1_prune_(net, 3 / 32, ["layer2.1.conv1"], X)
    assert removed == {"layer2.1.conv1": [3, 7, 11]}
    block = net.layer2[1]
    assert (block.conv1.out_channels, block.bn1.num_features, block.conv2.in_channels) == (29, 29, 29)
    keep = [i for i in range(32) if i not in (3, 7, 11)]
    torch.testing.assert_close(block.conv1.weight, ref.layer2[1].conv1.weight[keep])
    torch.testing.assert_close(block.conv2.weight, ref.layer2[1].conv2.weight[:, keep])
    # removing a filter = its map is zero after BN + ReLU: silence those channels in the reference
    bn = ref.layer2[1].bn1
    bn.weight.data[[3, 7, 11]] = 0
    bn.bias.data[[3, 7, 11]] = 0
    with torch.no_grad():
        torch.testing.assert_close(net(X), ref(X), rtol=1e-5, atol=1e-5)


def test_ratio_applies_to_every_selected_layer_and_keeps_one_filter():
    net = _net()
    names = select_prunable(net)
    assert names == [n for n, _ in net.named_modules() if n.endswith(".conv1")] and len(names) == 9
    removed = l1_prune_(net, 0.5, ["*.conv1"], X)
    assert {n: len(v) for n, v in removed.items()} == {n: net.get_submodule(n.replace("conv1", "conv2")).weight.shape[1]
                                                       for n in names}
    assert [net.get_submodule(n).out_channels for n in names] == [8] * 3 + [16] * 3 + [32] * 3
    tiny = _net()
    l1_prune_(tiny, 0.999, ["layer1.0.conv1"], X)
    assert tiny.layer1[0].conv1.out_channels == 1


def test_bad_inputs_are_clear_errors():
    net = _net()
    with pytest.raises(ValueError, match="tied to other layers"):
        l1_prune_(net, 0.5, ["layer1.0.conv2"], X)
    with pytest.raises(ValueError, match="ratio must be a number in"):
        l1_prune_(net, 1.0, ["*.conv1"], X)
    with pytest.raises(ValueError, match="no plain nn.Conv2d layer matches"):
        l1_prune_(net, 0.5, ["nothing*"], X)


def test_prune_to_macs_matches_budget_and_round_trips(tmp_path):
    net = _net()
    full = kse.profile(net, (1, 16, 16)).macs
    pruned, ratio, removed = prune_to_macs(net, 0.6 * full, ["*.conv1"], X)
    macs = kse.profile(pruned, (1, 16, 16)).macs
    assert 0.57 * full < macs <= 0.6 * full and 0 < ratio < 1 and len(removed) == 9  # a budget: never above
    assert kse.profile(net, (1, 16, 16)).macs == full  # the original is untouched
    with pytest.raises(ValueError, match="exceed the model's"):
        prune_to_macs(net, 2 * full, ["*.conv1"], X)
    with pytest.raises(ValueError, match="below"):
        prune_to_macs(net, 0.001 * full, ["*.conv1"], X)
    kse.save(pruned, tmp_path / "l1.kse", preprocess={"input_size": [1, 16, 16]})
    loaded = kse.load(tmp_path / "l1.kse").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), pruned(X))


# ----------------------------------------------------------------------------- Torch-Pruning global
def _silence(net, removed):
    """The reference for removed filters: their maps are zero after BN + ReLU."""
    for name, idxs in removed.items():
        bn = net.get_submodule(name.replace("conv1", "bn1"))
        bn.weight.data[idxs] = 0
        bn.bias.data[idxs] = 0


def test_tp_global_removes_the_globally_weakest_filters_exactly():
    net = _net()
    for m in net.modules():  # equal BatchNorm weights: the conv filters decide the group norms
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.fill_(1.0)
    weak = {"layer1.0.conv1": [1, 2], "layer3.1.conv1": [5]}
    for name, idxs in weak.items():
        net.get_submodule(name).weight.data[idxs] *= 1e-3
    total = sum(net.get_submodule(n).out_channels for n in select_prunable(net))
    ref = copy.deepcopy(net)
    removed = tp_global_prune_(net, 3 / total, ["*.conv1"], X)
    assert removed == weak  # the three weakest of all 336 filters, wherever they are
    assert net.layer1[0].conv1.out_channels == 14 and net.layer3[1].conv2.in_channels == 63
    _silence(ref, removed)
    with torch.no_grad():
        torch.testing.assert_close(net(X), ref(X), rtol=1e-5, atol=1e-5)


def test_tp_global_shares_the_ratio_out_unevenly_and_caps_each_layer():
    net = _net()
    # scores are divided by their layer's mean: 30 of 32 groups (filter, BN channel, next conv's
    # input channel) far under their layer's mean
    block = net.layer2[0]
    block.conv1.weight.data[2:] *= 1e-3
    block.bn1.weight.data[2:] *= 1e-3
    block.conv2.weight.data[:, 2:] *= 1e-3
    removed = tp_global_prune_(net, 0.3, ["*.conv1"], X, max_layer_ratio=0.75)
    assert len(removed["layer2.0.conv1"]) == 24  # capped at 75% of its 32 filters
    fractions = {n: len(v) / net.get_submodule(n.replace("conv1", "conv2")).in_channels for n, v in removed.items()}
    assert len(set(round(f, 3) for f in fractions.values())) > 1  # not one fraction everywhere
    # 30% of the 336 filters, less the 6 of layer2.0.conv1 that its cap keeps
    assert sum(len(v) for v in removed.values()) == round(0.3 * 336) - 6
    with pytest.raises(ValueError, match="ratio must be a number in"):
        tp_global_prune_(net, 1.0, ["*.conv1"], X)
    with pytest.raises(ValueError, match="tied to other layers"):
        tp_global_prune_(_net(), 0.2, ["layer1.0.conv2"], X)


def test_prune_to_macs_with_tp_global():
    net = _net()
    full = kse.profile(net, (1, 16, 16)).macs
    pruned, ratio, removed = prune_to_macs(net, 0.6 * full, ["*.conv1"], X, method="tp-global")
    macs = kse.profile(pruned, (1, 16, 16)).macs
    assert 0.57 * full < macs <= 0.6 * full and 0 < ratio < 1
    with pytest.raises(ValueError, match="method must be one of 'l1', 'tp-global'"):
        prune_to_macs(net, 0.6 * full, ["*.conv1"], X, method="random")

