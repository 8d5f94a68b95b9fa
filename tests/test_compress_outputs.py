"""Models whose output is not one tensor (dicts, tuples, lists, nested): compression removes their
dead channels and checks the outputs, of any nesting, are unchanged."""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import kse
from kse.compress import output_difference


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def test_output_difference_of_nested_outputs():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2, 3, generator=g) for _ in range(3))
    b2 = b + 1e-3
    assert output_difference(a, a.clone()) == 0.0
    assert math.isclose(output_difference(b, b2), _rel(b, b2), rel_tol=1e-6)
    nested = {"out": a, "aux": (b, [c, None]), "n": 3}
    same = {"out": a.clone(), "aux": (b.clone(), [c.clone(), None]), "n": 3}
    moved = {"out": a.clone(), "aux": (b2, [c.clone(), None]), "n": 3}
    assert output_difference(nested, same) == 0.0
    assert math.isclose(output_difference(nested, moved), _rel(b, b2), rel_tol=1e-6)
    different = [
        {"out": a, "aux": (b, [c, None])},                    # a key missing
        {"aux": (b, [c, None]), "out": a, "n": 3},            # keys in another order
        {"out": a, "aux": [b, [c, None]], "n": 3},            # list where a tuple was
        {"out": a, "aux": (b, [c]), "n": 3},                  # shorter list
        {"out": a[:1], "aux": (b, [c, None]), "n": 3},        # another shape
        {"out": a, "aux": (b, [c, None]), "n": 4},            # another value
        {"out": a, "aux": (b, [c, c]), "n": 3},               # a tensor where None was
    ]
    for other in different:
        assert output_difference(nested, other) == math.inf
    assert math.isnan(output_difference(a, a * float("nan")))  # not <= any tolerance


class DictNet(nn.Module):
    """A small CNN returning ``{"out": logits, "aux": (feature map, [pooled])}``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.bn1(self.conv1(x)))  # conv1's outputs are read by conv2 only
        x = F.relu(self.bn2(self.conv2(x)))
        return {"out": self.head(x).mean((2, 3)), "aux": (x, [x.amax((2, 3))])}


def _trained_like(net: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    return net.eval()


def _run(net, x):
    with torch.no_grad():
        return net.eval()(x)


def test_dict_output_model_gets_dead_channels_removed():
    torch.manual_seed(0)
    net = _trained_like(DictNet())
    x = torch.randn(2, 3, 12, 12)
    cfg = dict(G=4, input_size=(3, 12, 12), channel_multiple=1)
    kept = kse.compress(net, kse.KSEConfig(**cfg, remove_dead_channels=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither "removal skipped" nor a Torch-Pruning failure
        removed = kse.compress(net, kse.KSEConfig(**cfg))
    assert removed.conv1.out_channels == removed.bn1.num_features < 16  # conv2 drops some of its inputs
    assert removed.conv2.out_channels == 16  # read by the outputs: kept
    assert sum(p.numel() for p in removed.parameters()) < sum(p.numel() for p in kept.parameters())
    assert output_difference(_run(kept, x), _run(removed, x)) < 1e-5


def test_dead_channel_removal_is_skipped_when_a_dict_output_changes(monkeypatch):
    """The safety net (a misread graph) works on dict outputs too: a warning, and no removal."""
    compress_mod = importlib.import_module("kse.compress")  # the module, not the function kse.compress
    torch.manual_seed(0)
    net = _trained_like(DictNet())
    real = compress_mod.find_dead_channels

    def wrong(model, counts, example, multiple=1):
        # also removes a channel of conv2 that the head skips but the "aux" output returns
        removal = real(model, counts, example, multiple)
        c = int((counts["head"] == 0).nonzero()[0])
        removal.setdefault("conv2", {"out": set(), "in": set()})["out"] |= {c}
        removal.setdefault("bn2", {"out": set(), "in": set()})["out"] |= {c}
        removal.setdefault("head", {"out": set(), "in": set()})["in"] |= {c}
        return removal

    monkeypatch.setattr(compress_mod, "find_dead_channels", wrong)
    with pytest.warns(RuntimeWarning, match=r"dead-channel removal changed the outputs \(largest relative "
                                            r"difference inf\); it was skipped"):
        out = kse.compress(net, kse.KSEConfig(G=4, input_size=(3, 12, 12), channel_multiple=1))
    assert out.conv1.out_channels == 16 and out.conv2.out_channels == 16


def _dead_channels_removed_exactly(net: nn.Module) -> dict:
    """Compress a segmentation model (64 px) with and without dead-channel removal: removal
    leaves fewer parameters, warns of nothing, and the same outputs; the outputs."""
    net = _trained_like(net)
    x = torch.randn(2, 3, 64, 64)
    cfg = dict(G=4, input_size=(3, 64, 64), kmeans_iters=5, channel_multiple=1)
    kept = kse.compress(net, kse.KSEConfig(**cfg, remove_dead_channels=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        removed = kse.compress(net, kse.KSEConfig(**cfg))
    assert sum(p.numel() for p in removed.parameters()) < sum(p.numel() for p in kept.parameters())
    out = _run(removed, x)
    assert output_difference(_run(kept, x), out) < 1e-5
    return out


def test_torchvision_segmentation_model_with_dict_output():
    torch.manual_seed(0)
    out = _dead_channels_removed_exactly(torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        num_classes=3, weights=None, weights_backbone=None))
    assert list(out) == ["out"] and out["out"].shape == (2, 3, 64, 64)


@pytest.mark.slow
def test_torchvision_fcn_resnet50():
    torch.manual_seed(0)
    out = _dead_channels_removed_exactly(torchvision.models.segmentation.fcn_resnet50(
        num_classes=3, weights=None, weights_backbone=None, aux_loss=True))
    assert list(out) == ["out", "aux"]
