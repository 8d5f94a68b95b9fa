"""Counting: cross-checks against published figures and the paper's KSE accounting."""

import pytest
import torch
import torch.nn as nn
import torchvision

import kse
from kse.models import get_model
from kse.serialization import index_bit_widths


def test_cifar_resnet56_counts():
    p = kse.profile(get_model("resnet56", num_classes=10), (3, 32, 32))
    assert round(p.macs / 1e6) == 125  # 125.5 M in docs/method.md §9 / He et al.
    assert round(p.params / 1e6, 2) == 0.85


def test_torchvision_resnet50_counts():
    p = kse.profile(torchvision.models.resnet50(), (3, 224, 224))
    assert p.params == 25_557_032
    # conv + fc MACs: 4.089 G (torchvision's "4.09 GFLOPS"); the often quoted 4.11 G adds BN/ReLU/pool
    assert round(p.macs / 1e9, 3) == 4.089
    assert abs(p.macs - 4.11e9) / 4.11e9 < 0.01


def test_kse_layer_counted_as_in_paper():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    counts = torch.tensor([0, 1, 3, 6])
    layer = kse.KSEConv2d.from_conv(conv, counts)
    model = nn.Sequential(layer)
    p = kse.profile(model, (4, 5, 5))
    hw = 25
    assert p.macs == (1 + 3 + 6) * 9 * hw  # sum_c q_c kh kw H'W'
    assert p.fusion_adds == 6 * (3 - 1) * hw  # N (C_kept - 1) H'W'
    assert p.rows[0].dense_macs == 6 * 4 * 9 * hw
    assert p.params == 10 * 9
    # stored: 10 centroids x 9 floats, 4-bit mask, indices: q=3 -> 2 bits x 6 kernels (q=1, q=N need none)
    assert p.stored_bits == 10 * 9 * 32 + 4 + 6 * 2
    assert index_bit_widths(layer) == [0, 2, 0]


def test_compressed_resnet_counts_fall():
    net = get_model("resnet56")
    dense = kse.profile(net, (3, 32, 32))
    kse.compress_(net, kse.KSEConfig(G=4, input_size=(3, 32, 32)))
    small = kse.profile(net, (3, 32, 32))
    assert small.macs < dense.macs and small.params < dense.params and small.stored_bits < dense.stored_bits
    assert small.params == sum(t.numel() for t in net.parameters())
    assert net.training  # mode restored


def test_bad_input_size():
    with pytest.raises(ValueError, match=r"input_size must be \(C, H, W\)"):
        kse.profile(get_model("resnet20"), (32, 32))
