"""BatchNorm recalibration: statistics against a slow functional reference, modes and momentum
restored, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kse
from kse.recalibrate import batchnorm_layers



class SmallNet(nn.Module):
    """conv -> Dropout -> BN2d -> ReLU -> conv -> BN2d -> ReLU -> pool -> linear -> BN1d -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.drop = nn.Dropout2d(0.5)  # must be off during recalibration
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(6, momentum=0.3)
        self.fc1 = nn.Linear(6, 5)
        self.bn3 = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.drop(self.conv1(x))))
        x = F.relu(self.bn2(self.conv2(x)))
        x = x.mean((2, 3))
        return self.fc2(self.bn3(self.fc1(x)))


def _net(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    net = SmallNet()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bn in (net.bn1, net.bn2, net.bn3):  # stale statistics and a non-trivial affine map
            bn.running_mean.normal_(generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.normal_(generator=g)
            bn.num_batches_tracked.fill_(1000)
    return net


def _batches(count: int, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 2, 9, 9, generator=g) * 2 + 1, torch.randint(0, 3, (size,), generator=g))
            for _ in range(count)]


def _reference_stats(net: SmallNet, batches):
    """Each BatchNorm's input on each batch, computed with plain tensor operations (every BatchNorm
    normalising with its batch's statistics, Dropout off); then the average over batches of the
    per-channel mean and unbiased variance."""
    def batch_norm(z, bn, dims):
        mean, var = z.mean(dims, keepdim=True), z.var(dims, unbiased=False, keepdim=True)
        return (z - mean) / torch.sqrt(var + bn.eps) * _shape(bn.weight, z) + _shape(bn.bias, z)

    def _shape(v, z):
        return v.view(1, -1, *([1] * (z.dim() - 2)))

    sums = {name: [0.0, 0.0] for name in ("bn1", "bn2", "bn3")}
    with torch.no_grad():
        for x, _ in batches:
            z1 = F.conv2d(x, net.conv1.weight, net.conv1.bias, padding=1)
            z2 = F.conv2d(F.relu(batch_norm(z1, net.bn1, (0, 2, 3))), net.conv2.weight, stride=2)
            z3 = F.linear(F.relu(batch_norm(z2, net.bn2, (0, 2, 3))).mean((2, 3)), net.fc1.weight, net.fc1.bias)
            for name, z, dims in (("bn1", z1, (0, 2, 3)), ("bn2", z2, (0, 2, 3)), ("bn3", z3, (0,))):
                sums[name][0] = sums[name][0] + z.mean(dims)
                sums[name][1] = sums[name][1] + z.var(dims, unbiased=True)
    return {name: (m / len(batches), v / len(batches)) for name, (m, v) in sums.items()}


@pytest.mark.parametrize("count", [1, 3, 7])
def test_statistics_match_the_slow_reference(count):
    net = _net()
    data = _batches(count)
    kse.recalibrate_bn_(net, data, batches=count)
    ref = _reference_stats(net, data)
    for name, (mean, var) in ref.items():
        bn = getattr(net, name)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
        assert bn.num_batches_tracked.item() == count


def test_one_batch_gives_the_exact_mean_and_variance_of_the_data():
    net = _net()
    x = torch.randn(64, 2, 9, 9, generator=torch.Generator().manual_seed(5)) * 3 - 2
    kse.recalibrate_bn_(net, [x], batches=1)
    with torch.no_grad():
        z = net.conv1(x).permute(1, 0, 2, 3).reshape(4, -1).double()  # every value bn1 sees, per channel
    exact_mean = z.sum(1) / z.shape[1]
    exact_var = ((z - exact_mean[:, None]) ** 2).sum(1) / (z.shape[1] - 1)
    torch.testing.assert_close(net.bn1.running_mean.double(), exact_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.bn1.running_var.double(), exact_var, rtol=1e-5, atol=1e-6)


def test_only_the_first_batches_are_used_and_labels_are_ignored():
    data = _batches(5)
    a, b = _net(), _net()
    kse.recalibrate_bn_(a, data, batches=2)
    kse.recalibrate_bn_(b, iter([x for x, _ in data[:2]]), batches=2)  # bare tensors, a generator
    ref = _reference_stats(_net(), data[:2])
    for name, (mean, var) in ref.items():
        for net in (a, b):
            torch.testing.assert_close(getattr(net, name).running_mean, mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(getattr(net, name).running_var, var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_modes_momentum_and_parameters_are_restored(training):
    net = _net().train(training)
    net.drop.train(not training)  # a mixed tree comes back as it was
    modes = {name: m.training for name, m in net.named_modules()}
    params = {k: v.clone() for k, v in net.named_parameters()}
    kse.recalibrate_bn_(net, _batches(2), batches=2)
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert (net.bn1.momentum, net.bn2.momentum, net.bn3.momentum) == (0.1, 0.3, 0.1)
    for k, v in net.named_parameters():
        assert torch.equal(v, params[k]), k
        assert v.grad is None


def test_compressed_model_is_recalibrated_deterministically(tiny_kse):
    x = torch.randn(6, 8, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    a = tiny_kse()
    b = copy.deepcopy(a)
    before = [m.running_mean.clone() for m in batchnorm_layers(a)]
    kse.recalibrate_bn_(a, list(x), batches=6)
    kse.recalibrate_bn_(b, list(x), batches=6)
    after = batchnorm_layers(a)
    assert len(after) == 19  # ResNet-20: stem + 2 per block x 9 blocks
    assert all(m.num_batches_tracked.item() == 6 for m in after)
    assert any(not torch.equal(m.running_mean, old) for m, old in zip(after, before))
    for ma, mb in zip(after, batchnorm_layers(b)):
        assert torch.equal(ma.running_mean, mb.running_mean) and torch.equal(ma.running_var, mb.running_var)
    assert not a.training


def test_recalibration_recovers_the_statistics_of_the_data():
    """On stale statistics the eval-mode output is off; after recalibrating on one batch equal
    to the test input, eval-mode BN uses (almost) that batch's own statistics."""
    net = _net()
    x = torch.randn(256, 2, 9, 9, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        net.train().drop.eval()
        batch_stats = net(x)
        net.eval()
        stale = (net(x) - batch_stats).abs().max().item()
        kse.recalibrate_bn_(net, [x], batches=1)
        fresh = (net(x) - batch_stats).abs().max().item()
    assert fresh < 0.05 * stale  # left: unbiased against biased variance only


def test_errors():
    net = _net()
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="batches must be an integer >= 1"):
            kse.recalibrate_bn_(net, _batches(3), batches=bad)
    with pytest.raises(ValueError, match="has no BatchNorm layer with running statistics"):
        kse.recalibrate_bn_(nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU()), _batches(3), batches=1)
    with pytest.raises(ValueError, match="has no BatchNorm layer with running statistics"):
        kse.recalibrate_bn_(nn.Sequential(nn.BatchNorm2d(2, track_running_stats=False)), _batches(3), batches=1)
    with pytest.raises(ValueError, match="the loader has 3 batches, fewer than the 4 asked for"):
        kse.recalibrate_bn_(net, _batches(3), batches=4)
    with pytest.raises(TypeError, match="loader item 0 is a str"):
        kse.recalibrate_bn_(net, ["x"], batches=1)


def test_a_short_iterator_is_an_error_and_leaves_the_statistics_as_they_were():
    net = _net().train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="the loader has 2 batches, fewer than the 5 asked for"):
        kse.recalibrate_bn_(net, iter(_batches(2)), batches=5)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert net.training and net.bn1.momentum == 0.1 and net.bn2.momentum == 0.3
