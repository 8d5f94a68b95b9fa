"""CLI flags that the paper's recipes in configs/ need: ``kse finetune --milestones``
(the ImageNet schedule drops the rate at epochs 7 and 14 of 21, KSE.md §6)."""

from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch

import kse
from kse import train as kse_train
from kse.cli import main
from kse.data import dataset_info
from kse.models import get_model


def run(argv):
    """``kse.cli.main(argv)`` in process; returns ``(exit code, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def one_error_line(argv) -> str:
    code, out, err = run(argv)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.pop("WORLD_SIZE", None)
    yield
    torch.set_num_threads(threads)


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


def test_finetune_milestones_default_is_half_the_run(tiny_checkpoint, tmp_path, captured_fit):
    code, _, err = run(finetune_argv(tiny_checkpoint, tmp_path / "ft", "--epochs", 200))
    assert code == 0, err
    cfg = captured_fit["cfg"]
    assert cfg.milestones == [0.5] and cfg.schedule == "multistep" and cfg.gamma == 0.1
    assert kse_train.lr_at(cfg, 99 * 10 + 9, 10) == pytest.approx(0.01)
    assert kse_train.lr_at(cfg, 100 * 10, 10) == pytest.approx(0.001)


def test_finetune_milestones_flag(tiny_checkpoint, tmp_path, captured_fit):
    code, _, err = run(finetune_argv(tiny_checkpoint, tmp_path / "ft", "--epochs", 4, "--milestones", 0.25, 0.75))
    assert code == 0, err
    assert captured_fit["cfg"].milestones == [0.25, 0.75]


def test_imagenet_milestones_from_yaml_drop_exactly_at_epochs_7_and_14(tiny_checkpoint, tmp_path, captured_fit):
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


def test_finetune_milestones_scalar_in_yaml(tiny_checkpoint, tmp_path, captured_fit):
    config = tmp_path / "finetune.yaml"
    config.write_text("milestones: 0.5\n")
    code, _, err = run(finetune_argv(tiny_checkpoint, tmp_path / "ft", "--config", config, "--epochs", 2))
    assert code == 0, err
    assert captured_fit["cfg"].milestones == [0.5]


@pytest.mark.parametrize("value", ["1.5", "0", "-0.2"])
def test_finetune_milestones_out_of_range(tiny_checkpoint, tmp_path, value):
    line = one_error_line(finetune_argv(tiny_checkpoint, tmp_path / "ft", "--epochs", 2, "--milestones", value))
    assert "milestones must be fractions of epochs in (0, 1]" in line
    assert not (tmp_path / "ft").exists()
