"""The paper's recipes in configs/: every key is a flag of its stage with a value of the flag's
type, the numbers are the paper's (docs/method.md §4, §6, §8), the stages chain, the README gives the
commands, and every recipe runs train -> compress -> finetune on FakeData.

The end-to-end runs override data and size on the command line (explicit flags win over the
YAML): FakeData, 16 px (ImageNet recipes 32 px), one step. The ImageNet recipes' train stage
runs as written (``weights: IMAGENET1K_V1``, ``epochs: 0``: save torchvision's weights) with
torchvision's weight loading replaced by a seeded state dict, so no network is needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
import yaml
from torchvision.models._api import WeightsEnum

import kse
from kse.cli import build_parser
from kse.cli.common import finite_float, positive_int
from kse.train import TrainConfig, lr_at

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread for the module

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = ("train", "compress", "finetune")

# What each recipe must say (docs/method.md §4, §6, §9): model, data, KSE (G, T), fine-tuning
# (epochs, lr, batch size, epochs at which the rate drops x0.1), and the layers docs/method.md §8 compresses,
# as a rule on the baseline's Conv2d names.
CIFAR_FT = dict(epochs=200, lr=0.01, batch_size=128, drops=[100], weight_decay=1e-5)
IMAGENET_FT = dict(epochs=21, lr=0.001, batch_size=64, drops=[7, 14], weight_decay=1e-5)


def _resnet56_layers(name: str) -> bool:
    return name != "conv1"  # every block conv; option-A shortcuts have no conv


def _densenet40_layers(name: str) -> bool:
    return name not in ("conv1", "features.1.conv", "features.3.conv")  # stem, transitions


def _resnet50_layers(name: str) -> bool:
    return name != "conv1"  # bottleneck conv1/2/3 and downsample.0; not the 7x7 stem


def _densenet121_layers(name: str) -> bool:
    return name != "features.conv0" and ".transition" not in name


PAPER = {
    "cifar10-resnet56-g4": dict(arch="resnet56", dataset="cifar10", G=4, T=0, ft=CIFAR_FT, layers=_resnet56_layers),
    "cifar10-resnet56-g5": dict(arch="resnet56", dataset="cifar10", G=5, T=0, ft=CIFAR_FT, layers=_resnet56_layers),
    "cifar10-densenet40-g6": dict(arch="densenet40", dataset="cifar10", G=6, T=0, ft=CIFAR_FT,
                                  layers=_densenet40_layers),
    "svhn-resnet56-g4": dict(arch="resnet56", dataset="svhn", G=4, T=0, ft=CIFAR_FT, layers=_resnet56_layers),
    "imagenet-resnet50-g5t1": dict(arch="resnet50", dataset="imagenet", G=5, T=1, ft=IMAGENET_FT,
                                   layers=_resnet50_layers),
    "imagenet-densenet121-g5t1": dict(arch="densenet121", dataset="imagenet", G=5, T=1, ft=IMAGENET_FT,
                                      layers=_densenet121_layers),
}
RECIPES = sorted(PAPER)


def load(recipe: str, stage: str) -> dict:
    return yaml.safe_load((CONFIGS / recipe / f"{stage}.yaml").read_text())


def subparser(stage: str) -> argparse.ArgumentParser:
    return build_parser().commands[stage]


# ----------------------------------------------------------------------------- the files
def test_one_folder_per_recipe_with_one_file_per_stage():
    folders = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())
    assert folders == RECIPES
    for recipe in RECIPES:
        assert sorted(p.name for p in (CONFIGS / recipe).iterdir()) == sorted(f"{s}.yaml" for s in STAGES)


def _check_value(flag: str, action: argparse.Action, value) -> None:
    """``value`` as YAML gave it must be what the flag would parse to (PyYAML reads 1e-5 as a string)."""
    values = value if action.nargs in ("+", "*") else [value]
    if action.nargs in ("+", "*"):
        assert isinstance(value, list) and value, f"{flag}: expected a non-empty list, got {value!r}"
    for v in values:
        if action.nargs == 0:  # store_true, --x/--no-x
            assert isinstance(v, bool), f"{flag}: expected true or false, got {v!r}"
        elif action.type in (float, finite_float):
            assert isinstance(v, (int, float)) and not isinstance(v, bool), f"{flag}: expected a number, got {v!r}"
        elif action.type in (int, positive_int):
            assert isinstance(v, int) and not isinstance(v, bool), f"{flag}: expected an integer, got {v!r}"
        else:
            assert isinstance(v, str), f"{flag}: expected a string, got {v!r}"
        if action.choices is not None:
            assert v in action.choices, f"{flag}: {v!r} is not one of {action.choices}"


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_key_is_a_flag_of_its_stage(recipe, stage):
    config = load(recipe, stage)
    assert isinstance(config, dict) and config
    actions = subparser(stage).flags
    for key, value in config.items():
        dest = key.replace("-", "_")
        assert dest in actions and dest not in ("help", "config"), f"{recipe}/{stage}.yaml: {key!r} is no flag"
        _check_value(f"{recipe}/{stage}.yaml: {key}", actions[dest], value)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_numbers_are_the_papers(recipe):
    paper = PAPER[recipe]
    train, compress, finetune = (load(recipe, s) for s in STAGES)
    assert (train["arch"], train["dataset"], finetune["dataset"]) == (paper["arch"], paper["dataset"],
                                                                     paper["dataset"])
    assert train["data-dir"] == finetune["data-dir"] == f"data/{paper['dataset']}"
    assert (compress["G"], compress["T"], compress["alpha"]) == (paper["G"], paper["T"], 1.0)
    ft = paper["ft"]
    assert (finetune["epochs"], finetune["lr"], finetune["batch-size"], finetune["weight-decay"]) == (
        ft["epochs"], ft["lr"], ft["batch_size"], ft["weight_decay"])
    cfg = TrainConfig(epochs=finetune["epochs"], lr=finetune["lr"], schedule=finetune["schedule"],
                      milestones=finetune["milestones"])
    steps = 1_281_167 // 64  # ImageNet's steps per epoch at batch 64: the largest of the recipes
    drops = [e for e in range(1, cfg.epochs) if lr_at(cfg, e * steps, steps) < lr_at(cfg, e * steps - 1, steps)]
    assert drops == ft["drops"]
    assert [lr_at(cfg, e * steps, steps) for e in drops] == pytest.approx(
        [ft["lr"] * 0.1 ** (i + 1) for i in range(len(drops))])
    if paper["dataset"] == "imagenet":  # the paper's baseline is torchvision's pretrained model
        assert (train["weights"], train["epochs"]) == ("IMAGENET1K_V1", 0)
    else:
        assert (train["epochs"], train["lr"], train["batch-size"], train["schedule"]) == (200, 0.1, 128, "multistep")
        assert train["weight-decay"] in (5e-4, 1e-4)


@pytest.mark.parametrize("recipe", RECIPES)
def test_stages_chain(recipe):
    train, compress, finetune = (load(recipe, s) for s in STAGES)
    assert compress["checkpoint"] == f"{train['out']}/model.kse"
    assert finetune["checkpoint"] == compress["out"]
    assert compress["out"].startswith(f"runs/{recipe}/") and finetune["out"].startswith(f"runs/{recipe}/")


def test_resnet56_cifar10_recipes_share_one_baseline():
    assert load("cifar10-resnet56-g4", "train") == load("cifar10-resnet56-g5", "train")


def test_readme_lists_every_recipe_with_its_commands_in_order():
    text = (CONFIGS / "README.md").read_text()
    assert "data/<name>" in text and "placeholder" in text
    commands = text[text.index("## Commands"):]
    for recipe in RECIPES:
        assert f"`{recipe}`" in text
        where = [commands.find(f"kse {s} --config configs/{recipe}/{s}.yaml") for s in STAGES]
        assert -1 not in where and where == sorted(where), (recipe, where)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture
def offline_torchvision_weights(monkeypatch):
    """torchvision's ``get_state_dict`` answers with a seeded state dict of the right model."""
    calls = []

    def get_state_dict(self, *args, **kwargs):
        calls.append(str(self))
        arch = {"ResNet50_Weights": "resnet50", "DenseNet121_Weights": "densenet121"}[type(self).__name__]
        torch.manual_seed(7)
        return torchvision.models.get_model(arch).state_dict()

    monkeypatch.setattr(WeightsEnum, "get_state_dict", get_state_dict)
    return calls


def _conv_names(model: nn.Module):
    return {n for n, m in model.named_modules() if type(m) is nn.Conv2d}


def _kse_names(model: nn.Module):
    return {n for n, m in model.named_modules() if isinstance(m, kse.KSEConv2d)}


@pytest.mark.parametrize("recipe", [
    pytest.param(r, marks=pytest.mark.slow) if r == "imagenet-resnet50-g5t1" else r  # compress: ~30 s on one thread
    for r in RECIPES])
def test_recipe_runs_on_fakedata(recipe, tmp_path, offline_torchvision_weights, ok):
    paper = PAPER[recipe]
    config = {s: CONFIGS / recipe / f"{s}.yaml" for s in STAGES}
    imagenet = paper["dataset"] == "imagenet"
    # ImageNet models at 64 px: at 32 px their last stages are 1x1, BatchNorm then normalises 2 values per
    # channel, and the first step diverges (outputs overflow), which fine-tuning reports as an error
    size, batch = (64, 2) if imagenet else (16, 4)
    data = ["--dataset", "fake", "--fake-size", 8, "--batch-size", batch, "--workers", 0, "--device", "cpu"]

    # train: CIFAR/SVHN one step from scratch; ImageNet as written, saving the (stand-in) pretrained weights
    steps = [] if imagenet else ["--epochs", 1, "--max-steps", 1]
    ok(["train", "--config", config["train"], "--input-size", size, *data, *steps, "--out", tmp_path / "train"])
    baseline_file = tmp_path / "train" / "model.kse"
    assert baseline_file.is_file() and (tmp_path / "train" / "args.json").is_file()
    baseline = kse.load(baseline_file)
    assert baseline.kse_arch["name"] == paper["arch"]
    assert offline_torchvision_weights == (["ResNet50_Weights.IMAGENET1K_V1"] if paper["arch"] == "resnet50" else
                                           ["DenseNet121_Weights.IMAGENET1K_V1"] if imagenet else [])
    if imagenet:
        assert baseline.kse_extra["pretrained"].endswith(".IMAGENET1K_V1")
    else:
        assert (tmp_path / "train" / "metrics.jsonl").is_file()

    # compress: the recipe's G, T and layer choice (docs/method.md §8)
    compressed_file = tmp_path / "compressed.kse"
    ok(["compress", "--config", config["compress"], "--checkpoint", baseline_file, "--out", compressed_file])
    compressed = kse.load(compressed_file)
    assert (compressed.kse_config["G"], compressed.kse_config["T"]) == (paper["G"], paper["T"])
    expected = {n for n in _conv_names(baseline) if paper["layers"](n)}
    assert _kse_names(compressed) == expected

    # finetune: one step
    ok(["finetune", "--config", config["finetune"], "--checkpoint", compressed_file, *data, "--epochs", 1,
        "--max-steps", 1, "--out", tmp_path / "finetune"])
    for name in ("model.kse", "metrics.jsonl", "last.ckpt", "args.json"):
        assert (tmp_path / "finetune" / name).is_file(), name
    assert _kse_names(kse.load(tmp_path / "finetune" / "model.kse")) == expected
