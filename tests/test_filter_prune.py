"""L1-norm filter pruning (the peer baseline): filter choice, exact surgery, MAC matching, files."""

from __future__ import annotations

import copy

import pytest
import torch

import kse
from kse.filter_prune import l1_filter_norms, l1_prune_, prune_to_macs, select_prunable
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
    assert abs(macs - 0.6 * full) < 0.03 * full and 0 < ratio < 1 and len(removed) == 9
    assert kse.profile(net, (1, 16, 16)).macs == full  # the original is untouched
    with pytest.raises(ValueError, match="exceed the model's"):
        prune_to_macs(net, 2 * full, ["*.conv1"], X)
    with pytest.raises(ValueError, match="below"):
        prune_to_macs(net, 0.001 * full, ["*.conv1"], X)
    kse.save(pruned, tmp_path / "l1.kse", preprocess={"input_size": [1, 16, 16]})
    loaded = kse.load(tmp_path / "l1.kse").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), pruned(X))
