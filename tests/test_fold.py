"""Folding BatchNorm (and ReLU) into the convolution before it: same function, fewer modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import kse
from kse import fused
from kse.conv import KSEConv2d
from kse.fold import bn_affine, fold_batchnorm
from kse.models import get_model



def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters away from 0 / 1, so that a missed fold shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def _forms():
    return ["train", "dense", "full", "split"] + (["fused", "fused@1,full@4"] if fused.available() else [])


@pytest.mark.parametrize("form", _forms())
def test_folded_model_computes_the_same_function(form, tiny_kse, assert_same_function):
    model = _randomize_bn(tiny_kse())
    kse.deploy_(model, form=form)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    kse_layers = [m for m in folded.modules() if isinstance(m, KSEConv2d)]
    assert all(m.epilogue is not None for m in kse_layers)
    # each block's first conv is followed by BN + ReLU, the second by BN, then the residual sum
    assert sum(m.epilogue[2] for m in kse_layers) == len(kse_layers) // 2
    assert all(m.epilogue is None for m in model.modules() if isinstance(m, KSEConv2d))  # a copy
    for b in (1, 5):
        x = torch.randn(b, 1, 16, 16, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            assert_same_function(folded(x), model(x))


def test_dense_conv_and_bn_fold_into_one_conv(assert_same_function):
    model = _randomize_bn(get_model("resnet20", num_classes=10, in_channels=1)).eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert_same_function(folded(x), model(x))


def test_epilogue_math_against_the_modules(assert_same_function):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    bn = _randomize_bn(nn.Sequential(nn.BatchNorm2d(6)))[0].eval()
    layer = KSEConv2d.from_conv(conv, torch.tensor([2, 0, 6, 3])).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        ref = torch.relu(bn(layer(x)))
        s, t = bn_affine(bn)
        layer.set_epilogue(s, t, relu=True)
        for form in _forms():
            layer.set_form(form)
            assert_same_function(layer(x), ref)
        layer.set_epilogue(None)
        assert_same_function(layer(x), layer.to_conv()(x))
    with pytest.raises(ValueError, match="6 values"):
        layer.set_epilogue(torch.ones(5), torch.zeros(6))


def test_folded_model_cannot_be_saved(tmp_path, tiny_kse):
    model = tiny_kse()
    next(m for m in model.modules() if isinstance(m, KSEConv2d)).set_epilogue(torch.ones(16), torch.zeros(16))
    with pytest.raises(ValueError, match="before kse.fold_batchnorm"):
        kse.save(model, tmp_path / "m.kse")
    assert not (tmp_path / "m.kse").exists()


class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)


def test_untraceable_model_is_one_clear_error():
    class Branchy(_ConvBN):
        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="torch.fx could not trace Branchy"):
        fold_batchnorm(Branchy())


def test_bn_read_twice_is_not_folded(assert_same_function):
    class TwoReaders(_ConvBN):
        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv's raw output is read elsewhere: folding would change it

    model = _randomize_bn(TwoReaders()).eval()
    folded = fold_batchnorm(model)
    assert any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        assert_same_function(folded(x), model(x))


def test_module_called_twice_is_not_folded(assert_same_function):
    class Shared(_ConvBN):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(2)

        def forward(self, x):  # one conv, two BatchNorms: folding either would change the other call
            return self.bn(self.conv(x)) + self.bn2(self.conv(x))

    model = _randomize_bn(Shared()).eval()
    folded = fold_batchnorm(model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 2
    x = torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        assert_same_function(folded(x), model(x))
