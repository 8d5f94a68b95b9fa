"""CLI flags that the paper's recipes in configs/ need: ``kse finetune --milestones``
(the ImageNet schedule drops the rate at epochs 7 and 14 of 21, docs/method.md §6) and
``kse train --weights W --epochs 0`` (the ImageNet baselines are torchvision's pretrained
weights). No network: torchvision's weight loading is replaced by a seeded state dict."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from torchvision.models._api import WeightsEnum

import kse
from kse import train as kse_train
from kse.data import dataset_info
from kse.models import get_model

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread for the module


# ----------------------------------------------------------------------------- finetune --milestones
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("flags") / "tiny.kse"
    kse.save(get_model("resnet20", num_classes=10), path, preprocess=dataset_info("fake").preprocess())
    return path


@pytest.fixture
def captured_fit(monkeypatch):
    """Replace ``kse.train.fit`` (imported by ``kse finetune`` when it runs) by a recorder."""
    seen = {}

    def fake_fit(model, train_loader, test_loader, cfg, out_dir, device, resume=False):
        seen["cfg"] = cfg
        return []

    monkeypatch.setattr(kse_train, "fit", fake_fit)
    return seen


def finetune_argv(checkpoint, out, *extra):
    return ["finetune", "--checkpoint", checkpoint, "--out", out, "--fake-size", 8, "--batch-size", 4,
            "--device", "cpu", *extra]


def test_finetune_milestones_default_is_half_the_run(tiny_checkpoint, tmp_path, captured_fit, run):
    code, _, err = run(finetune_argv(tiny_checkpoint, tmp_path / "ft", "--epochs", 200))
    assert code == 0, err
    cfg = captured_fit["cfg"]
    assert cfg.milestones == [0.5] and cfg.schedule == "multistep" and cfg.gamma == 0.1
    assert kse_train.lr_at(cfg, 99 * 10 + 9, 10) == pytest.approx(0.01)
    assert kse_train.lr_at(cfg, 100 * 10, 10) == pytest.approx(0.001)


def test_finetune_milestones_flag(tiny_checkpoint, tmp_path, captured_fit, run):
    code, _, err = run(finetune_argv(tiny_checkpoint, tmp_path / "ft", "--epochs", 4, "--milestones", 0.25, 0.75))
    assert code == 0, err
    assert captured_fit["cfg"].milestones == [0.25, 0.75]


def test_compile_flag_reaches_the_training_config(tiny_checkpoint, tmp_path, captured_fit, run):
    code, _, err = run(finetune_argv(tiny_checkpoint, tmp_path / "plain"))
    assert code == 0 and captured_fit["cfg"].compile is False, err  # off by default
    code, _, err = run(finetune_argv(tiny_checkpoint, tmp_path / "compiled", "--compile"))
    assert code == 0 and captured_fit["cfg"].compile is True, err


def _argv(command, tiny_checkpoint, out):
    if command == "finetune":
        return finetune_argv(tiny_checkpoint, out)
    return ["train", "--arch", "resnet20", "--dataset", "fake", "--fake-size", 8, "--input-size", 16,
            "--batch-size", 4, "--device", "cpu", "--out", out]


@pytest.mark.parametrize("command", ["finetune", "train"])
def test_a_step_that_cannot_compile_is_one_error_line(command, tiny_checkpoint, tmp_path, failing_compile,
                                                      one_error_line, compiler):
    from torch._dynamo.exc import BackendCompilerFailed

    failing_compile(BackendCompilerFailed(lambda: None, RuntimeError("no lowering for aten.foo"), None))
    line = one_error_line([*_argv(command, tiny_checkpoint, tmp_path / "ft"), "--compile", "--epochs", 1,
                           "--max-steps", 1])
    assert line == (f"kse {command}: error: torch.compile failed on the training step (RuntimeError: no lowering "
                    "for aten.foo); train without compiling (no --compile, TrainConfig(compile=False))")
    assert not (tmp_path / "ft" / "model.kse").exists()


@pytest.mark.parametrize("command", ["finetune", "train"])
def test_no_compiler_is_one_error_line_before_any_work(command, tiny_checkpoint, tmp_path, monkeypatch,
                                                       one_error_line):
    from torch._inductor import cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    def none_found():
        raise InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", none_found)
    line = one_error_line([*_argv(command, tiny_checkpoint, tmp_path / "ft"), "--compile"])
    assert line.startswith(f"kse {command}: error: torch.compile needs a C++ compiler on the CPU and found none")
    assert not (tmp_path / "ft").exists()  # said before the folder, the arguments or the data


def test_imagenet_milestones_from_yaml_drop_exactly_at_epochs_7_and_14(tiny_checkpoint, tmp_path, captured_fit, run):
    # the fractions the ImageNet recipes use: 7/21 and 14/21 rounded down, so the drop lands on the epoch boundary
    config = tmp_path / "finetune.yaml"
    config.write_text("epochs: 21\nlr: 0.001\nmilestones: [0.3333333333, 0.6666666666]\n")
    code, _, err = run(finetune_argv(tiny_checkpoint, tmp_path / "ft", "--config", config))
    assert code == 0, err
    cfg = captured_fit["cfg"]
    steps_per_epoch = 1_281_167 // 64  # ImageNet train split at batch 64, drop_last
    lrs = {epoch: [kse_train.lr_at(cfg, epoch * steps_per_epoch + d, steps_per_epoch) for d in (-1, 0)]
           for epoch in (7, 14)}
    assert lrs[7] == pytest.approx([1e-3, 1e-4])
    assert lrs[14] == pytest.approx([1e-4, 1e-5])


def test_finetune_milestones_scalar_in_yaml(tiny_checkpoint, tmp_path, captured_fit, run):
    config = tmp_path / "finetune.yaml"
    config.write_text("milestones: 0.5\n")
    code, _, err = run(finetune_argv(tiny_checkpoint, tmp_path / "ft", "--config", config, "--epochs", 2))
    assert code == 0, err
    assert captured_fit["cfg"].milestones == [0.5]


@pytest.mark.parametrize("value", ["1.5", "0", "-0.2"])
def test_finetune_milestones_out_of_range(tiny_checkpoint, tmp_path, value, one_error_line):
    line = one_error_line(finetune_argv(tiny_checkpoint, tmp_path / "ft", "--epochs", 2, "--milestones", value))
    assert "milestones must be fractions of epochs in (0, 1]" in line
    assert not (tmp_path / "ft").exists()


# ----------------------------------------------------------------------------- train --weights
@pytest.fixture
def fake_torchvision_weights(monkeypatch):
    """torchvision's ``get_state_dict`` answers with a seeded resnet18 state dict; records the calls."""
    torch.manual_seed(123)
    state = torchvision.models.resnet18().state_dict()
    calls = []

    def get_state_dict(self, *args, **kwargs):
        calls.append(str(self))
        return state

    monkeypatch.setattr(WeightsEnum, "get_state_dict", get_state_dict)
    return state, calls


def test_train_weights_epochs_0_saves_the_pretrained_model(tmp_path, fake_torchvision_weights, run):
    state, calls = fake_torchvision_weights
    out = tmp_path / "base"
    code, stdout, err = run(["train", "--arch", "resnet18", "--weights", "DEFAULT", "--epochs", 0, "--dataset", "fake",
                             "--input-size", 32, "--out", out])
    assert code == 0, err
    assert calls == ["ResNet18_Weights.IMAGENET1K_V1"]
    assert "wrote" in stdout and not (out / "metrics.jsonl").exists() and (out / "args.json").is_file()
    model = kse.load(out / "model.kse")
    loaded = model.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):  # FakeData has 10 classes: a new classifier
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert model.fc.out_features == 10
    assert "weights" not in model.kse_arch["kwargs"]  # kse.load rebuilds without fetching weights
    assert model.kse_extra["pretrained"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert model.kse_preprocess["input_size"] == [3, 32, 32]


def test_train_from_pretrained_weights(tmp_path, fake_torchvision_weights, run):
    state, calls = fake_torchvision_weights
    out = tmp_path / "tuned"
    code, _, err = run(["train", "--arch", "resnet18", "--weights", "ResNet18_Weights.IMAGENET1K_V1", "--epochs", 1,
                        "--max-steps", 1, "--dataset", "fake", "--input-size", 16, "--fake-size", 8,
                        "--batch-size", 4, "--lr", 1e-3, "--device", "cpu", "--out", out])
    assert code == 0, err
    assert calls == ["ResNet18_Weights.IMAGENET1K_V1"]
    model = kse.load(out / "model.kse")
    assert model.kse_extra["pretrained"] == "ResNet18_Weights.IMAGENET1K_V1"
    moved = (model.state_dict()["conv1.weight"] - state["conv1.weight"]).abs().max().item()
    assert 0 < moved < 0.1  # one small step away from the pretrained weights


def test_train_weights_none_is_random_initialisation(tmp_path, fake_torchvision_weights, run):
    _, calls = fake_torchvision_weights
    code, _, err = run(["train", "--arch", "resnet18", "--weights", "none", "--epochs", 1, "--max-steps", 1,
                        "--dataset", "fake", "--input-size", 16, "--fake-size", 8, "--batch-size", 4,
                        "--device", "cpu", "--out", tmp_path / "scratch"])
    assert code == 0, err
    assert calls == []
    assert "pretrained" not in (kse.load(tmp_path / "scratch" / "model.kse").kse_extra or {})


@pytest.mark.parametrize("argv, match", [
    (["--arch", "resnet20", "--weights", "DEFAULT"], "'resnet20' is not a torchvision model"),
    (["--arch", "resnet18", "--weights", "IMAGENET9K"], "resnet18 has no weights 'IMAGENET9K'; choose one of: "
                                                        "IMAGENET1K_V1, DEFAULT"),
    (["--arch", "resnet18"], "epochs must be an integer >= 1, got 0; --epochs 0 is only for saving --weights"),
])
def test_train_weights_errors(argv, match, tmp_path, fake_torchvision_weights, one_error_line):
    line = one_error_line(["train", *argv, "--epochs", 0, "--dataset", "fake", "--out", tmp_path / "x"])
    assert match in line
    assert fake_torchvision_weights[1] == [] and not (tmp_path / "x").exists()


def test_train_weights_offline_is_one_line(tmp_path, monkeypatch, one_error_line):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    line = one_error_line(["train", "--arch", "resnet18", "--weights", "DEFAULT", "--epochs", 0, "--dataset", "fake",
                           "--out", tmp_path / "x"])
    assert "--weights ResNet18_Weights.IMAGENET1K_V1: could not load them" in line
    assert "hub/checkpoints" in line and not (tmp_path / "x").exists()
