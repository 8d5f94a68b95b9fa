"""Training recipes: exact resume, learning-rate schedules, config validation, evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from torch.utils.data import DataLoader

from kse.data import get_dataset
from kse.models import get_model
from kse.train import (TrainConfig, build_optimizer, evaluate, fit, load_training_state, lr_at,
                       save_training_state)

CPU = torch.device("cpu")


def _loaders(batch_size: int = 8):
    train_ds, info = get_dataset("fake", train=True, fake_size=32, input_size=16)
    test_ds, _ = get_dataset("fake", train=False, fake_size=32, input_size=16)
    train = DataLoader(train_ds, batch_size, shuffle=True, drop_last=True)
    test = DataLoader(test_ds, 16, shuffle=False)
    return train, test, info


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return get_model("resnet20", num_classes=10, in_channels=3)


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, lr=0.05, batch_size=8, max_steps_per_epoch=3, channels_last=True, seed=7)
    return TrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- resume
def test_resume_matches_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    train, test, _ = _loaders()
    straight = _model(0)
    history = fit(straight, train, test, _cfg(), tmp_path / "straight", CPU)
    assert [row["epoch"] for row in history] == [1, 2]

    class Interrupted(Exception):
        pass

    def crash_after_first_epoch(epoch, row):
        if epoch == 0:
            raise Interrupted

    with pytest.raises(Interrupted):  # same config, stopped after epoch 1 as by a crash
        fit(_model(0), train, test, _cfg(), tmp_path / "resumed", CPU, on_epoch_end=crash_after_first_epoch)
    # A fresh model with different initial weights: everything must come from last.ckpt.
    resumed = _model(123)
    history2 = fit(resumed, train, test, _cfg(), tmp_path / "resumed", CPU, resume=True)
    assert [row["epoch"] for row in history2] == [1, 2]

    expected, got = straight.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=f"{name} differs")
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_loss"] == pytest.approx(history[1]["train_loss"], abs=0)


def test_training_state_round_trips_optimizer(tmp_path):
    train, test, _ = _loaders()
    model = _model(0)
    fit(model, train, test, _cfg(epochs=1, max_steps_per_epoch=2), tmp_path, CPU)
    clone = _model(1)
    optimizer = build_optimizer(clone, _cfg())
    meta = load_training_state(tmp_path / "last.ckpt", clone, optimizer)
    assert meta["epoch"] == 0 and len(meta["history"]) == 1
    assert meta["extra"]["train_config"]["seed"] == 7
    buffers = [optimizer.state[p]["momentum_buffer"] for g in optimizer.param_groups for p in g["params"]]
    assert len(buffers) == sum(1 for _ in clone.parameters()) and all(b.abs().sum() > 0 for b in buffers[:3])


def test_load_training_state_rejects_foreign_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    model = _model(0)
    with pytest.raises(ValueError, match="not a kse training checkpoint"):
        load_training_state(path, model, build_optimizer(model, _cfg()))


# ----------------------------------------------------------------------------- schedules
def test_cosine_schedule_values():
    cfg = TrainConfig(epochs=10, lr=0.1, schedule="cosine")
    steps = 100  # per epoch; 1000 in total
    assert lr_at(cfg, 0, steps) == pytest.approx(0.1)
    assert lr_at(cfg, 500, steps) == pytest.approx(0.05)
    assert lr_at(cfg, 250, steps) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert lr_at(cfg, 999, steps) == pytest.approx(0.05 * (1 + math.cos(math.pi * 999 / 1000)))
    assert lr_at(cfg, 999, steps) < 1e-5


def test_multistep_schedule_values():
    cfg = TrainConfig(epochs=10, lr=0.1, schedule="multistep", milestones=[0.5, 0.75], gamma=0.1)
    steps = 10
    assert lr_at(cfg, 0, steps) == pytest.approx(0.1)
    assert lr_at(cfg, 49, steps) == pytest.approx(0.1)  # last step of epoch 4
    assert lr_at(cfg, 50, steps) == pytest.approx(0.01)  # epoch 5 = 0.5 * 10
    assert lr_at(cfg, 74, steps) == pytest.approx(0.01)
    assert lr_at(cfg, 75, steps) == pytest.approx(0.001)  # epoch 7.5 = 0.75 * 10
    assert lr_at(cfg, 99, steps) == pytest.approx(0.001)


def test_warmup_is_linear_then_joins_schedule():
    cfg = TrainConfig(epochs=10, lr=0.1, schedule="multistep", warmup_epochs=1)
    steps = 10
    assert lr_at(cfg, 0, steps) == pytest.approx(0.01)
    assert lr_at(cfg, 4, steps) == pytest.approx(0.05)
    assert lr_at(cfg, 9, steps) == pytest.approx(0.1)
    assert lr_at(cfg, 10, steps) == pytest.approx(0.1)


def test_fit_sets_the_scheduled_lr(tmp_path):
    train, test, _ = _loaders()
    seen = []
    model = _model(0)
    cfg = _cfg(epochs=2, schedule="multistep", milestones=[0.5], gamma=0.1, lr=0.2, max_steps_per_epoch=2)
    fit(model, train, test, cfg, tmp_path, CPU, on_epoch_end=lambda epoch, row: seen.append(epoch))
    with safe_open(str(tmp_path / "last.ckpt"), "pt") as f:
        meta = json.loads(f.metadata()["kse_training_state"])
    assert seen == [0, 1]
    assert all(g["lr"] == pytest.approx(0.02) for g in meta["param_groups"])  # epoch 1 is past the milestone


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), r"epochs must be an integer >= 1, got 0"),
    (dict(epochs=2.5), r"epochs must be an integer >= 1, got 2.5"),
    (dict(lr=0.0), r"lr must be a positive number, got 0.0"),
    (dict(lr=float("nan")), r"lr must be a positive number, got nan"),
    (dict(batch_size=0), r"batch_size must be an integer >= 1, got 0"),
    (dict(schedule="step"), r"schedule must be 'cosine' or 'multistep', got 'step'"),
    (dict(weight_decay=-1.0), r"weight_decay must be a finite number >= 0, got -1.0"),
    (dict(weight_decay=math.inf), r"weight_decay must be a finite number >= 0, got inf"),
    (dict(momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
    (dict(milestones=[0.5, 1.5]), r"milestones must be fractions of epochs in \(0, 1\]"),
    (dict(gamma=0.0), r"gamma must be in \(0, 1\]"),
    (dict(warmup_epochs=-1.0), r"warmup_epochs must be in \[0, epochs\)"),
    (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
    (dict(max_steps_per_epoch=0), r"max_steps_per_epoch must be None or an integer >= 1"),
    (dict(nesterov="no"), r"nesterov must be true or false, got 'no'"),
    (dict(compile=1), r"compile must be true or false, got 1"),
])
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_train_config_defaults_are_valid_and_independent():
    a, b = TrainConfig(), TrainConfig()
    a.milestones.append(0.9)
    assert b.milestones == [0.5, 0.75]


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_counts_and_ranges():
    _, test, _ = _loaders()
    model = _model(0)
    stats = evaluate(model, test, CPU)
    assert stats["count"] == len(test.dataset) == 8
    assert 0 <= stats["top1"] <= stats["top5"] <= 100
    assert math.isfinite(stats["loss"]) and stats["loss"] > 0
    assert not model.training


def test_evaluate_is_exact_for_a_known_classifier():
    """A model that always predicts class 0 scores exactly the share of label 0."""
    _, test, _ = _loaders()
    labels = torch.cat([y for _, y in test])

    class Constant(torch.nn.Module):
        def forward(self, x):
            logits = torch.arange(10, 0, -1, dtype=torch.float32)  # ranks classes 0, 1, 2, ...
            return logits.expand(x.shape[0], 10)

    stats = evaluate(Constant(), test, CPU)
    assert stats["top1"] == pytest.approx(100 * (labels == 0).float().mean().item())
    assert stats["top5"] == pytest.approx(100 * (labels < 5).float().mean().item())
    assert evaluate(Constant(), test, CPU, max_batches=0)["count"] == 0


def test_training_state_keeps_the_amp_scaler(tmp_path):
    model = _model(0)
    optimizer = build_optimizer(model, _cfg())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scaler.scale(torch.ones(()))  # the scale tensor is created lazily
    scaler.update(new_scale=1024.0)
    save_training_state(tmp_path / "last.ckpt", model, optimizer, 0, [], scaler=scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    clone = _model(1)
    meta = load_training_state(tmp_path / "last.ckpt", clone, build_optimizer(clone, _cfg()), fresh)
    assert meta["grad_scaler"]["scale"] == 1024.0
    fresh.scale(torch.ones(()))
    assert fresh.get_scale() == 1024.0


def test_amp_on_cpu_trains_in_bfloat16_with_float32_weights(tmp_path):
    train, test, _ = _loaders()
    model = _model(0)
    seen = []
    model.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = model.fc.weight.detach().clone()
    history = fit(model, train, test, _cfg(epochs=1, amp=True), tmp_path, CPU)
    assert seen and set(seen[:3]) == {torch.bfloat16}  # training steps ran under bfloat16 autocast
    assert seen[-1] == torch.float32  # evaluation does not
    assert model.fc.weight.dtype == torch.float32 and not torch.equal(model.fc.weight, before)
    assert math.isfinite(history[-1]["train_loss"])


# ----------------------------------------------------------------------------- torch.compile
def _small_kse_net(seed: int) -> nn.Module:
    """A network small enough to compile in seconds, with one KSE layer among dense ones."""
    import kse

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10))
    kse.compress_(net, kse.KSEConfig(G=4, include=["3"]))
    assert type(net[3]).__name__ == "KSEConv2d"
    return net


def test_compiled_training_matches_eager_and_resumes(tmp_path, compiler):
    """``compile=True`` runs the same steps and evaluations through torch.compile: the first
    epoch compiles the training step (one more graph once the KSE layer's training index exists)
    and the evaluation, the second (a switch to evaluation and back between them) nothing more;
    a stop and ``resume`` continue compiled; the weights and metrics are those of eager training."""
    from torch._dynamo.utils import counters

    torch.set_num_threads(1)
    train, test, _ = _loaders()
    cfg = dict(epochs=3, channels_last=False)
    eager = _small_kse_net(0)
    want = fit(eager, train, test, _cfg(**cfg), tmp_path / "eager", CPU)

    class Stop(Exception):
        pass

    graphs = []

    def stop_after_second_epoch(epoch, row):
        graphs.append(counters["stats"]["unique_graphs"])
        if epoch == 1:
            raise Stop

    torch._dynamo.reset()
    counters.clear()
    with pytest.raises(Stop):
        fit(_small_kse_net(0), train, test, _cfg(compile=True, **cfg), tmp_path / "compiled", CPU,
            on_epoch_end=stop_after_second_epoch)
    # the step and the evaluation compiled, and neither again in the second epoch
    assert 2 <= graphs[0] <= 4 and graphs[1] == graphs[0], graphs
    compiled = _small_kse_net(0)
    with torch.no_grad():  # other weights: everything must come from last.ckpt
        for p in compiled.parameters():
            p.add_(1.0)
    got = fit(compiled, train, test, _cfg(compile=True, **cfg), tmp_path / "compiled", CPU, resume=True)
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    for key in ("train_loss", "test_loss", "test_top1"):
        assert [row[key] for row in got] == pytest.approx([row[key] for row in want], rel=1e-4, abs=1e-4), key


def _backend_failure(inner: Exception) -> Exception:
    from torch._dynamo.exc import BackendCompilerFailed

    return BackendCompilerFailed(lambda: None, inner, None)


def _cpp_compile_error() -> Exception:
    from torch._inductor.exc import CppCompileError

    return CppCompileError(["g++", "x.cpp"], "cc1plus: fatal error")


@pytest.mark.parametrize("failure, match", [
    (lambda: _backend_failure(_cpp_compile_error()),
     r"could not build the training step's C\+\+ code \(CppCompileError: .*cc1plus: fatal error.*needs a working "
     r"C\+\+ compiler; train without compiling \(no --compile"),
    (lambda: _backend_failure(NotImplementedError("no lowering for aten.foo")),
     r"^torch.compile failed on the training step \(NotImplementedError: no lowering for aten.foo\); train "
     r"without compiling"),
])
def test_a_failed_compilation_is_one_error_that_says_what_to_do(failure, match, tmp_path, failing_compile,
                                                                compiler):
    from kse.train import CompileError

    failing_compile(failure())
    train, test, _ = _loaders()
    with pytest.raises(CompileError, match=match) as info:
        fit(_small_kse_net(0), train, test, _cfg(compile=True), tmp_path, CPU)
    assert "TORCHDYNAMO_VERBOSE" not in str(info.value)  # torch's own advice is left out
    assert not (tmp_path / "last.ckpt").exists()


def test_evaluation_runs_through_the_compiled_module(tmp_path, monkeypatch, compiler):
    """With ``compile=True`` every test batch goes through what torch.compile returned, with the
    module in eval mode, and the metrics are those of the module itself; a compilation failure
    there names the evaluation."""
    from torch._dynamo.exc import BackendCompilerFailed

    from kse.train import CompileError

    calls = []

    def recording_compile(model, *args, **kwargs):  # runs the module eagerly: what is recorded is who ran
        def run(x):
            calls.append((model.training, x.shape[0]))
            return model(x)
        return run

    train, test, _ = _loaders()
    want = fit(_small_kse_net(0), train, test, _cfg(channels_last=False), tmp_path / "eager", CPU)
    monkeypatch.setattr(torch, "compile", recording_compile)
    got = fit(_small_kse_net(0), train, test, _cfg(compile=True, channels_last=False), tmp_path / "compiled", CPU)
    assert [n for training, n in calls if not training] == [len(y) for _, y in test] * 2  # each epoch's test set
    assert [n for training, n in calls if training] == [8] * 6
    for key in ("test_loss", "test_top1"):
        assert [row[key] for row in got] == [row[key] for row in want], key

    def failing_in_eval(model, *args, **kwargs):
        def run(x):
            if not model.training:
                raise BackendCompilerFailed(lambda: None, NotImplementedError("no lowering for aten.bar"), None)
            return model(x)
        return run

    monkeypatch.setattr(torch, "compile", failing_in_eval)
    with pytest.raises(CompileError, match=r"^torch.compile failed on the evaluation \(NotImplementedError: no "
                                           r"lowering for aten.bar\); train without compiling"):
        fit(_small_kse_net(0), train, test, _cfg(compile=True), tmp_path / "failing", CPU)
    assert not (tmp_path / "failing" / "last.ckpt").exists()


def test_other_errors_of_a_compiled_step_pass_through(tmp_path, failing_compile, compiler):
    failing_compile(FloatingPointError("a step of the model's own"))
    train, test, _ = _loaders()
    with pytest.raises(FloatingPointError, match="a step of the model's own"):
        fit(_small_kse_net(0), train, test, _cfg(compile=True), tmp_path, CPU)


def test_no_compiler_is_said_before_training(tmp_path, monkeypatch):
    from torch._inductor import cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    from kse.train import CompileError

    def none_found():
        raise InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", none_found)
    train, test, _ = _loaders()
    with pytest.raises(CompileError, match=r"needs a C\+\+ compiler on the CPU and found none \(InvalidCxxCompiler; "
                                           r"install g\+\+ or set \$CXX\)"):
        fit(_small_kse_net(0), train, test, _cfg(compile=True), tmp_path, CPU)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_optimizer_default_and_official():
    # default: Nesterov momentum, no weight decay on BatchNorm / bias; official (the KSE
    # authors' code): plain momentum, weight decay on every parameter

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    net(torch.randn(1, 3, 5, 5))
    ours = build_optimizer(net, TrainConfig(weight_decay=1e-5))
    assert ours.defaults["nesterov"] is True
    assert [(len(g["params"]), g["weight_decay"]) for g in ours.param_groups] == [(2, 1e-5), (4, 0.0)]
    official = build_optimizer(net, TrainConfig(weight_decay=1e-5, nesterov=False, decay_norm_and_bias=True))
    assert official.defaults["nesterov"] is False
    assert [(len(g["params"]), g["weight_decay"]) for g in official.param_groups] == [(6, 1e-5), (0, 0.0)]


def test_finetune_steps_runs_whole_epochs_of_capped_length():
    from kse.train import finetune_steps

    train, _, _ = _loaders()  # 32 images, batch 8: 4 batches per epoch
    model = _model(0)
    before = [p.detach().clone() for p in model.parameters()]
    summary = finetune_steps(model, train, steps=6, lr=0.01, device=CPU, seed=3)
    # 6 steps over 4-batch epochs: 2 epochs of ceil(6 / 2) = 3 steps
    assert {k: summary[k] for k in ("steps", "epochs", "lr", "weight_decay", "batch_size")} == {
        "steps": 6, "epochs": 2, "lr": 0.01, "weight_decay": 1e-5, "batch_size": 8}
    assert math.isfinite(summary["train_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_finetune_steps_errors():
    from kse.train import finetune_steps

    empty = DataLoader(get_dataset("fake", train=True, fake_size=4, input_size=16)[0], 8, drop_last=True)
    with pytest.raises(ValueError, match="the training split is smaller than one batch"):
        finetune_steps(_model(0), empty, steps=3, lr=0.01, device=CPU)
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        finetune_steps(_model(0), _loaders()[0], steps=0, lr=0.01, device=CPU)


# ----------------------------------------------------------------------------- runs that must not report success
def test_zero_steps_is_an_error(tmp_path):
    """A batch larger than the dataset with drop_last: no step, so no training."""
    train_ds, _ = get_dataset("fake", train=True, fake_size=32, input_size=16)
    train = DataLoader(train_ds, 64, shuffle=True, drop_last=True)
    _, test, _ = _loaders()
    with pytest.raises(ValueError, match="no batch per epoch \\(32 samples, batch size 64, incomplete batches "
                                         "dropped\\).*--batch-size"):
        fit(_model(0), train, test, _cfg(), tmp_path, CPU)
    assert not (tmp_path / "last.ckpt").exists()


def test_divergence_stops_before_anything_is_saved(tmp_path):
    """lr 1e6: the loss stays finite (if huge) but the BatchNorm statistics overflow."""
    train, test, _ = _loaders()
    with pytest.raises(FloatingPointError, match="BatchNorm statistic layer1.0.bn1.running_var holds NaN or Inf "
                                                 "after epoch 1 .*lower the learning rate \\(--lr, now 1e\\+06\\)"):
        fit(_model(0), train, test, _cfg(lr=1e6), tmp_path, CPU)
    assert not (tmp_path / "last.ckpt").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_non_finite_outputs_stop_training(tmp_path):
    """A -inf logit leaves the cross-entropy finite; the outputs are checked themselves."""
    train, test, _ = _loaders()

    class NeverClass10(nn.Module):  # an eleventh class no label names, at -inf
        def __init__(self):
            super().__init__()
            self.net = _model(0)

        def forward(self, x):
            out = self.net(x)
            return torch.cat([out, out.new_full((len(out), 1), -math.inf)], 1)

    model = NeverClass10()
    with pytest.raises(FloatingPointError, match="the outputs hold NaN or Inf at epoch 1 step 1"):
        fit(model, train, test, _cfg(), tmp_path, CPU)


def test_evaluate_refuses_non_finite_outputs():
    _, test, _ = _loaders()
    model = _model(0)
    with torch.no_grad():
        model.bn1.running_var.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="outputs hold NaN or Inf for 8 of 8 images"):
        evaluate(model, test, CPU)


def test_a_stop_between_checkpoint_and_metrics_loses_no_line(tmp_path, monkeypatch):
    import kse.train as train_module

    train, test, _ = _loaders()
    real_save = train_module.save_training_state

    class Killed(Exception):
        pass

    def save_then_die(*args, **kwargs):  # the checkpoint is renamed into place, then the process dies
        real_save(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(train_module, "save_training_state", save_then_die)
    with pytest.raises(Killed):
        fit(_model(0), train, test, _cfg(), tmp_path, CPU)
    monkeypatch.setattr(train_module, "save_training_state", real_save)
    history = fit(_model(1), train, test, _cfg(), tmp_path, CPU, resume=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows == json.loads(json.dumps(history))
