"""kse.feature_reuse: dense blocks found by shape, and the map against a slow per-channel loop."""

import math

import pytest
import torch
import torch.nn as nn

import kse
from kse.feature_reuse import feature_reuse, find_dense_blocks, plot_feature_reuse
from kse.models import get_model


class _Layer(nn.Module):
    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(torch.relu(self.bn(x)))], 1)


class _TinyDense(nn.Module):
    """stem (not a block: equal widths) -> a dense block of 4 layers, 5 input channels, growth 3."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 5, 3, padding=1), nn.Conv2d(5, 5, 3, padding=1))
        self.block = nn.Sequential(*[_Layer(5 + 3 * j, 3) for j in range(4)])
        self.fc = nn.Linear(17, 2)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


def test_blocks_of_kse_densenet40_and_torchvision_densenet121():
    blocks = find_dense_blocks(get_model("densenet40", num_classes=10, in_channels=1))
    assert [(b.name, len(b.layers), b.block_input, b.growth) for b in blocks] == [
        ("features.0", 12, 16, 12), ("features.2", 12, 160, 12), ("features.4", 12, 304, 12)]
    assert blocks[1].layers[3] == "features.2.3.conv"
    tv = get_model("densenet121", num_classes=10)
    blocks = find_dense_blocks(tv)
    assert [(len(b.layers), b.block_input, b.growth) for b in blocks] == [(6, 64, 32), (12, 128, 32),
                                                                          (24, 256, 32), (16, 512, 32)]
    assert blocks[0].layers[0] == "features.denseblock1.denselayer1.conv1"


def test_map_matches_a_per_channel_loop():
    torch.manual_seed(0)
    model = _TinyDense()
    cfg = kse.KSEConfig(G=4)
    (block,) = feature_reuse(model, cfg)
    assert block.block == "block" and block.layers == [f"block.{j}.conv" for j in range(4)]
    plans = {p.name: p for p in kse.plan(model, kse.KSEConfig(G=4, include=block.layers, skip_first=False))}
    for j, name in enumerate(block.layers):
        v, counts = plans[name].indicator.tolist(), plans[name].counts.tolist()
        groups = {}
        for c in range(len(v)):
            source = 0 if c < 5 else (c - 5) // 3 + 1
            groups.setdefault(source, []).append((v[c], counts[c] == 0))
        for i in range(5):
            if i > j:
                assert math.isnan(block.mean_indicator[j][i]) and math.isnan(block.dropped_fraction[j][i])
                continue
            vals = groups[i]
            assert block.mean_indicator[j][i] == pytest.approx(sum(x for x, _ in vals) / len(vals), abs=1e-12)
            assert block.dropped_fraction[j][i] == pytest.approx(sum(d for _, d in vals) / len(vals), abs=1e-12)
    d = block.to_dict()
    assert d["sources"] == ["block input", "layer 0", "layer 1", "layer 2", "layer 3"]
    assert d["mean_indicator"][0][1] is None


def test_every_layer_drops_its_weakest_channel_somewhere():
    # min-max normalisation gives the weakest channel of every layer v = 0, which KSE drops
    (block,) = feature_reuse(_TinyDense(), kse.KSEConfig(G=4))
    for j, row in enumerate(block.dropped_fraction):
        assert any(x > 0 for x in row[: j + 1])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no dense block"):
        feature_reuse(get_model("resnet20", num_classes=10))
    model = _TinyDense()
    kse.compress_(model, kse.KSEConfig(G=4, include=["block.1.conv"], skip_first=False,
                                       remove_dead_channels=False))
    with pytest.raises(ValueError, match="'block.1.conv' is already compressed"):
        feature_reuse(model)
    with pytest.raises(TypeError, match="kse.KSEConfig"):
        feature_reuse(_TinyDense(), {"G": 4})


def test_plot_writes_a_png(tmp_path):
    blocks = feature_reuse(_TinyDense(), kse.KSEConfig(G=4))
    out = plot_feature_reuse(blocks, tmp_path / "reuse.png", title="tiny")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["reuse.png"]


def test_kse_analyze_writes_the_map_for_a_densenet(tmp_path, capsys):
    import json

    from kse.cli import main

    path = tmp_path / "dense.kse"
    kse.save(get_model("densenet40", num_classes=10, in_channels=1), path,
             preprocess={"input_size": [1, 28, 28], "mean": [0.5], "std": [0.25]})
    assert main(["analyze", "--checkpoint", str(path), "--G", "6", "--out", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert text.count("feature reuse, features.") == 3
    assert (tmp_path / "a" / "feature_reuse.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert [b["block"] for b in data["feature_reuse"]] == ["features.0", "features.2", "features.4"]
    assert len(data["feature_reuse"][2]["mean_indicator"]) == 12
    # a network without dense blocks gets no map, and no error
    plain = tmp_path / "plain.kse"
    kse.save(get_model("resnet20", num_classes=10, in_channels=1), plain,
             preprocess={"input_size": [1, 28, 28], "mean": [0.5], "std": [0.25]})
    assert main(["analyze", "--checkpoint", str(plain), "--json"]) == 0
    assert "feature_reuse" not in json.loads(capsys.readouterr().out)
