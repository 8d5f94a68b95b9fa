"""Stochastic weight averaging: the running mean against a stacked mean, and ``fit`` with
``swa_from`` (the mean of the epochs' weights, BatchNorm re-estimated, exact resume)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from kse.data import get_dataset
from kse.models import get_model
from kse.recalibrate import recalibrate_bn_
from kse.train import TrainConfig, evaluate, fit
from kse.weight_average import accumulate_, averaged_parameters, check_average, load_average_

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    net[0].bias.requires_grad_(False)  # frozen: not averaged
    return net


# ----------------------------------------------------------------------------- the running mean
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_running_mean_is_the_stacked_mean(dtype):
    net = _net(0).to(dtype)
    snapshots, average = [], {}
    for count in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p, dtype=torch.float32).to(dtype) * (count + 1))
        snapshots.append({k: p.detach().float().clone() for k, p in averaged_parameters(net).items()})
        accumulate_(average, net, count)
    assert set(average) == {"0.weight", "1.weight", "1.bias", "3.weight", "3.bias"}  # 0.bias is frozen
    for name, mean in average.items():
        assert mean.dtype == torch.float32
        torch.testing.assert_close(mean, torch.stack([s[name] for s in snapshots]).mean(0), rtol=1e-5, atol=1e-6)
    frozen = net[0].bias.detach().clone()
    load_average_(net, average)
    for name, p in averaged_parameters(net).items():
        assert p.dtype == dtype
        torch.testing.assert_close(p.float(), average[name].to(dtype).float(), rtol=0, atol=0)
    assert torch.equal(net[0].bias, frozen)


def test_first_accumulation_replaces_what_was_there():
    average = {"stale": torch.zeros(1)}
    net = _net(0)
    accumulate_(average, net, 0)
    assert set(average) == set(averaged_parameters(net))
    assert torch.equal(average["3.weight"], net[3].weight.detach())


@pytest.mark.parametrize("count", [-1, 1.5, True])
def test_count_must_be_a_non_negative_integer(count):
    with pytest.raises(ValueError, match="count must be an integer >= 0"):
        accumulate_({}, _net(0), count)


def test_average_of_another_model_is_refused():
    average = {}
    accumulate_(average, _net(0), 0)
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    other[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"weight average of 3.weight has shape \(2, 144\), the model's parameter \(3, 144\)"):
        accumulate_(average, other, 1)
    with pytest.raises(ValueError, match=r"missing \['0.bias'\]"):
        load_average_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 2)), average)
    average["1.bias"][0] = float("nan")
    with pytest.raises(ValueError, match="1.bias holds NaN or Inf"):
        check_average(average, _net(0))


# ----------------------------------------------------------------------------- fit(swa_from=...)
def _loaders():
    train_ds, _ = get_dataset("fake", train=True, fake_size=32, input_size=16)
    test_ds, _ = get_dataset("fake", train=False, fake_size=32, input_size=16)
    return DataLoader(train_ds, 8, shuffle=True, drop_last=True), DataLoader(test_ds, 16, shuffle=False)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return get_model("resnet20", num_classes=10, in_channels=3)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(epochs=3, lr=0.05, batch_size=8, max_steps_per_epoch=3, seed=7, swa_from=2,
                                 channels_last=False), **kw})


@pytest.mark.parametrize("amp", [False, True])
def test_fit_ends_with_the_mean_of_the_averaged_epochs(tmp_path, amp):
    train, test = _loaders()
    model = _model(0)
    ends = []
    history = fit(model, train, test, _cfg(amp=amp), tmp_path, CPU, on_epoch_end=lambda epoch, row: ends.append(
        {k: p.detach().clone() for k, p in averaged_parameters(model).items()}))
    assert len(ends) == 3
    for name, p in averaged_parameters(model).items():  # epochs 2 and 3, not 1
        torch.testing.assert_close(p.detach(), (ends[1][name] + ends[2][name]) / 2, rtol=1e-6, atol=1e-7)
    assert [r["epoch"] for r in history] == [1, 2, 3, 3] and history[-1]["swa_epochs"] == 2
    assert "swa_epochs" not in history[2] and "train_loss" not in history[-1]
    # the row is the averaged model's own evaluation, BatchNorm statistics from one pass of the
    # training data in the run's seeded order (three batches, as max_steps_per_epoch), in the
    # training steps' precision (bfloat16 autocast with amp on the CPU)
    assert history[-1]["test_top1"] == pytest.approx(evaluate(model, test, CPU)["top1"], abs=0)
    again, other = _model(5), _model(5)
    for net, autocast in ((again, amp), (other, not amp)):
        net.load_state_dict(model.state_dict())
        torch.manual_seed(7 * 1000 + 3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            recalibrate_bn_(net, train, batches=3)
    for (name, a), b in zip(model.named_buffers(), again.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not torch.equal(model.bn1.running_var, other.bn1.running_var)  # the precision shows in the statistics
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == json.loads(json.dumps(history))


def test_resume_with_an_average_matches_an_uninterrupted_run(tmp_path):
    train, test = _loaders()
    straight = _model(0)
    fit(straight, train, test, _cfg(), tmp_path / "straight", CPU)

    class Interrupted(Exception):
        pass

    def crash_after_second_epoch(epoch, row):
        if epoch == 1:  # one epoch averaged so far
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(_model(0), train, test, _cfg(), tmp_path / "resumed", CPU, on_epoch_end=crash_after_second_epoch)
    resumed = _model(99)
    history = fit(resumed, train, test, _cfg(), tmp_path / "resumed", CPU, resume=True)
    assert history[-1]["swa_epochs"] == 2
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{name} differs")
    with pytest.raises(ValueError, match="holds a weight average of 2 epochs, but --swa-from 1 after 3 epochs "
                                         "makes 3"):
        fit(_model(0), train, test, _cfg(swa_from=1), tmp_path / "resumed", CPU, resume=True)
    with pytest.raises(ValueError, match="holds a weight average of 2 epochs, but --swa-from None"):
        fit(_model(0), train, test, _cfg(swa_from=None), tmp_path / "resumed", CPU, resume=True)


@pytest.mark.parametrize("swa_from", [0, 4, 1.0, True])
def test_swa_from_must_be_an_epoch_of_the_run(swa_from):
    with pytest.raises(ValueError, match=r"swa_from must be None or an epoch in \[1, epochs\] = \[1, 3\]"):
        _cfg(swa_from=swa_from)


def test_finetune_swa_from_writes_the_averaged_model(tmp_path, ok):
    import kse
    from kse.data import dataset_info

    ckpt = tmp_path / "tiny.kse"
    kse.save(get_model("resnet20", num_classes=10), ckpt, preprocess=dataset_info("fake").preprocess())
    _, err = ok(["finetune", "--checkpoint", ckpt, "--out", tmp_path / "ft", "--fake-size", 16, "--batch-size", 8,
                 "--device", "cpu", "--epochs", 2, "--swa-from", 1, "--max-steps", 2, "--no-channels-last"])
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("swa_epochs") for r in rows] == [None, None, 2]
    assert "weight average of epochs 1-2: re-estimating BatchNorm statistics over 2 training batches" in err
    saved = kse.load(tmp_path / "ft" / "model.kse")
    assert saved.kse_extra["finetune"]["swa_from"] == 1
    assert saved.kse_extra["finetune"]["test_top1"] == rows[-1]["test_top1"]


def test_finetune_swa_from_past_the_last_epoch_is_one_error_line(tmp_path, one_error_line):
    import kse
    from kse.data import dataset_info

    ckpt = tmp_path / "tiny.kse"
    kse.save(get_model("resnet20", num_classes=10), ckpt, preprocess=dataset_info("fake").preprocess())
    line = one_error_line(["finetune", "--checkpoint", ckpt, "--out", tmp_path / "ft", "--fake-size", 8,
                           "--device", "cpu", "--epochs", 2, "--swa-from", 3])
    assert "swa_from must be None or an epoch in [1, epochs] = [1, 2], got 3" in line
    assert not (tmp_path / "ft").exists()
