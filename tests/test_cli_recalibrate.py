"""`kse compress`, `kse prune-l1` and `kse prune` with `--recalibrate N` on FakeData (16 px resnet20):
the written BatchNorm statistics are those of kse.recalibrate_bn_ on the same batches, and the
errors are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kse
from kse.data import DEBIAN_FMNIST
from kse.models import get_model
from kse.recalibrate import batchnorm_layers, calibration_loader

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread for the module


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, ok):
    work = tmp_path_factory.mktemp("recal")
    ok(["train", "--dataset", "fake", "--arch", "resnet20", "--input-size", 16, "--fake-size", 32, "--epochs", 1,
        "--max-steps", 2, "--batch-size", 8, "--no-channels-last", "--out", work / "base", "--device", "cpu"])
    return work / "base" / "model.kse"


def _expected(model: torch.nn.Module, batches: int, batch_size: int) -> torch.nn.Module:
    loader, _ = calibration_loader("fake", batch_size=batch_size, seed=0, input_size=16)
    kse.recalibrate_bn_(model, loader, batches=batches)
    return model


def _assert_same_statistics(got: torch.nn.Module, ref: torch.nn.Module) -> None:
    pairs = list(zip(batchnorm_layers(got), batchnorm_layers(ref)))
    assert len(pairs) == 19
    for a, b in pairs:
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-6, atol=1e-7)


def test_compress_recalibrates_on_the_training_batches(baseline, tmp_path, ok):
    plain, recal = tmp_path / "plain.kse", tmp_path / "recal.kse"
    ok(["compress", "--checkpoint", baseline, "--out", plain])
    out, err = ok(["compress", "--checkpoint", baseline, "--out", recal, "--recalibrate", 3, "--batch-size", 16])
    assert "recalibrating 19 BatchNorm layers on 3 training batches of 16 images" in err
    assert "BatchNorm statistics of 19 layers recalibrated on 3 fake training batches of 16 images" in out
    got = kse.load(recal)
    assert got.kse_extra["recalibrated"] == {"batches": 3, "batch_size": 16, "dataset": "fake", "split": "train",
                                             "augmentation": False, "order_seed": 0, "batchnorm_layers": 19}
    ref = _expected(kse.load(plain), 3, 16)
    _assert_same_statistics(got, ref)
    # the statistics did change, and nothing else did
    before = kse.load(plain)
    assert not torch.equal(batchnorm_layers(got)[5].running_mean, batchnorm_layers(before)[5].running_mean)
    for (k, a), (_, b) in zip(got.state_dict().items(), before.state_dict().items()):
        if "running_" not in k and "num_batches_tracked" not in k:
            assert torch.equal(a, b), k
    # deterministic: the same file twice
    again = tmp_path / "again.kse"
    ok(["compress", "--checkpoint", baseline, "--out", again, "--recalibrate", 3, "--batch-size", 16])
    _assert_same_statistics(kse.load(again), got)


@pytest.mark.parametrize("command", [["prune-l1"], ["prune", "--method", "tp-global"]])
def test_pruning_recalibrates_the_same_way(baseline, tmp_path, ok, command):
    plain, recal = tmp_path / "plain.kse", tmp_path / "recal.kse"
    ok([*command, "--checkpoint", baseline, "--out", plain, "--ratio", 0.5])
    out, _ = ok([*command, "--checkpoint", baseline, "--out", recal, "--ratio", 0.5, "--recalibrate", 2,
                 "--batch-size", 16])
    assert "recalibrated on 2 fake training batches of 16 images" in out
    got = kse.load(recal)
    assert got.kse_extra["recalibrated"]["batches"] == 2
    _assert_same_statistics(got, _expected(kse.load(plain), 2, 16))
    # pruning a recalibrated file again, without --recalibrate, drops the record that no longer holds
    ok([*command, "--checkpoint", recal, "--out", tmp_path / "again.kse", "--ratio", 0.25])
    assert "recalibrated" not in kse.load(tmp_path / "again.kse").kse_extra


def test_calibration_loader_has_no_augmentation_and_a_fixed_order():
    loader, info = calibration_loader("fake", batch_size=8, seed=0, input_size=16)
    ds = loader.dataset
    assert all(torch.equal(ds[i][0], ds[i][0]) for i in range(8))  # no random crop or flip
    augmented, _ = kse.data.get_dataset("fake", train=True, input_size=16)
    assert not all(torch.equal(augmented[i][0], augmented[i][0]) for i in range(8))
    first = [x for x, _ in zip(calibration_loader("fake", batch_size=8, seed=0, input_size=16)[0], range(3))]
    again = [x for x, _ in zip(calibration_loader("fake", batch_size=8, seed=0, input_size=16)[0], range(3))]
    other = [x for x, _ in zip(calibration_loader("fake", batch_size=8, seed=1, input_size=16)[0], range(3))]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    assert len(loader) == 256 // 8 and info.name == "fake"
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        calibration_loader("fake", batch_size=0)


@pytest.mark.parametrize("argv, message", [
    (["--recalibrate", -1], "--recalibrate must be >= 0, got -1"),
    (["--recalibrate", 2, "--batch-size", 0], "--batch-size must be >= 1, got 0"),
    (["--recalibrate", 40, "--batch-size", 16], "--recalibrate 40: the fake training split has only 16 batches of 16 "
                                                "images; lower --recalibrate or --batch-size"),
    (["--dataset", "fake"], "--dataset and --data-dir only tell --recalibrate N where the training images are"),
    (["--recalibrate", 2, "--dataset", "nosuch"], "unknown dataset 'nosuch'; choose one of"),
])
@pytest.mark.parametrize("command", [["compress"], ["prune-l1", "--ratio", "0.5"], ["prune", "--ratio", "0.5"]])
def test_errors(baseline, tmp_path, command, argv, message, one_error_line):
    line = one_error_line([*command, "--checkpoint", baseline, "--out", tmp_path / "x.kse", *argv])
    assert line.startswith(f"kse {command[0]}: error: ") and message in line
    assert not (tmp_path / "x.kse").exists()


@pytest.mark.skipif(not Path(DEBIAN_FMNIST).is_dir(), reason="Fashion-MNIST not installed")
def test_a_dataset_that_does_not_fit_the_model(baseline, tmp_path, one_error_line):
    line = one_error_line(["compress", "--checkpoint", baseline, "--out", tmp_path / "x.kse", "--recalibrate", 2,
                           "--dataset", "fashion-mnist"])
    assert line == (f"kse compress: error: dataset 'fashion-mnist' has 1-channel images but the model in {baseline} "
                    "reads 3 channels; use the dataset it was trained on ('fake')")


def test_a_model_without_batchnorm_is_one_clear_error(tmp_path, one_error_line):
    path = tmp_path / "nobn.kse"
    kse.save(get_model("squeezenet1_1", num_classes=10), path,
             preprocess={"dataset": "fake", "input_size": [3, 32, 32], "num_classes": 10})
    line = one_error_line(["compress", "--checkpoint", path, "--out", tmp_path / "x.kse", "--recalibrate", 2])
    assert line == (f"kse compress: error: --recalibrate: {path} has no BatchNorm layer with running statistics, "
                    "so there is nothing to recalibrate; leave --recalibrate out")
