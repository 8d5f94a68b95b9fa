"""When no convolution is eligible, the error says why for each and names the option that helps."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torchvision.models import SwinTransformer, VisionTransformer

import kse
from kse.conv import KSEConv2d


def _small_vit():
    return VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                             mlp_dim=32, num_classes=10).eval()


def _small_swin():
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                           window_size=[2, 2], num_classes=10).eval()


@pytest.mark.parametrize("build,first", [(_small_vit, "conv_proj"), (_small_swin, "features.0.0")])
def test_transformer_error_names_skip_first_and_the_fix_works(build, first):
    torch.manual_seed(0)
    net = build()
    cfg = dict(input_size=(3, 32, 32))
    with pytest.raises(ValueError, match=rf"no eligible convolution to compress: the model has 1 plain nn.Conv2d "
                                         rf"layers; '{first}' is the first convolution .*"
                                         r"KSEConfig\(skip_first=False\) compresses it; \d+ nn.Linear layers, "
                                         r"which KSE does not compress"):
        kse.compress_(net, kse.KSEConfig(**cfg))
    assert not any(isinstance(m, KSEConv2d) for m in net.modules())  # unchanged
    x = torch.randn(2, 3, 32, 32)
    kse.compress_(net, kse.KSEConfig(**cfg, skip_first=False))  # what the message says
    assert [n for n, m in net.named_modules() if isinstance(m, KSEConv2d)] == [first]
    assert net(x).shape == (2, 10)


def test_each_reason_is_named():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3),
                        nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.LazyLinear(2))
    net(torch.randn(1, 3, 16, 16))
    cfg = kse.KSEConfig(input_size=(3, 16, 16), include=["2", "3", "4"], exclude=["3"],
                        filter_fn=lambda m, name: name != "4")
    with pytest.raises(ValueError) as err:
        kse.compress_(net, cfg)
    msg = str(err.value)
    assert msg.startswith("no eligible convolution to compress: the model has 5 plain nn.Conv2d layers; ")
    for part in ("'0' is the first convolution", "1 grouped, depthwise or non-zero-padded", "e.g. '2'",
                 "1 outside include=['2', '3', '4']: widen the patterns (e.g. '5')",
                 "1 matched by exclude=['3']: narrow the patterns (e.g. '3')", "rejected by filter_fn (e.g. '4')",
                 "1 nn.Linear layers"):
        assert part in msg, part
    kse.compress_(net, kse.KSEConfig(input_size=(3, 16, 16)))
    with pytest.raises(ValueError, match=r"3 already KSE layers \(compress the dense model instead\)"):
        kse.compress_(net, kse.KSEConfig(input_size=(3, 16, 16)))
    with pytest.raises(ValueError, match="has 0 plain nn.Conv2d layers; 1 nn.Linear layers.*; the model has no nn.Conv2d layer"):
        kse.compress_(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)), kse.KSEConfig(input_size=(3, 1, 1)))
