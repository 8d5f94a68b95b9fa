"""What the command line refuses, each as one line and exit status 2: NaN / Inf and other bad
numbers on any flag, damaged or edited files, a full disk, a model whose outputs are not finite."""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import pytest
import torch

import kse
from kse.cli import build_parser, main
from kse.cli.common import finite_float
from kse.data import get_dataset
from kse.models import get_model

pytestmark = pytest.mark.usefixtures("one_thread")


def run_kse(argv):
    """``kse`` in process, argument errors included; returns ``(exit code, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def error_line(argv) -> str:
    """The one error line of a run that must fail with status 2 (progress lines aside)."""
    code, out, err = run_kse(argv)
    assert code == 2, (out, err)
    errors = [line for line in err.strip().splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A dense and a compressed ResNet-20 on 16-pixel FakeData."""
    folder = tmp_path_factory.mktemp("checks")
    _, info = get_dataset("fake", train=False, fake_size=32, input_size=16)
    net = get_model("resnet20", num_classes=10).eval()
    dense = kse.save(net, folder / "dense.kse", preprocess=info.preprocess())
    kse.compress_(net, kse.KSEConfig(G=4, input_size=(3, 16, 16)))
    compressed = kse.save(net, folder / "compressed.kse", preprocess=info.preprocess())
    return folder, dense, compressed


# ----------------------------------------------------------------------------- numbers
def _real_flags():
    for name, parser in build_parser().commands.items():
        for dest, action in parser.flags.items():
            if action.type is finite_float:
                yield name, action.option_strings[0]


def test_every_real_valued_flag_is_checked_for_finite_values():
    """No flag parses with plain float (which takes 'nan' and 'inf')."""
    plain = [(name, a.option_strings) for name, p in build_parser().commands.items() for a in p.flags.values()
             if a.type is float]
    assert plain == []
    assert {("prune-l1", "--ratio"), ("train", "--lr"), ("finetune", "--lr"),
            ("compress", "--alpha"), ("finetune", "--weight-decay"), ("train", "--warmup-epochs")} <= set(_real_flags())


@pytest.mark.parametrize("command,flag", sorted(set(_real_flags())))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_inf_are_refused_on_every_real_valued_flag(command, flag, value):
    line = error_line([command, f"{flag}={value}"])
    assert line.startswith(f"kse {command}: error: argument {flag}: must be a finite number, got '{value}'")


def test_prune_l1_macs_nan_writes_nothing(files):
    folder, dense, _ = files
    line = error_line(["prune-l1", "--checkpoint", dense, "--macs", "nan", "--out", folder / "p.kse"])
    assert "--macs: cannot read 'nan'; give a positive number" in line and not (folder / "p.kse").exists()
    with pytest.raises(ValueError, match="target MACs must be a finite number > 0, got nan"):
        kse.filter_prune.prune_to_macs(get_model("resnet20"), float("nan"), ["*.conv1"], torch.zeros(1, 3, 16, 16))


def test_nan_in_a_config_file_is_refused(files, tmp_path):
    _, dense, _ = files
    (tmp_path / "c.yaml").write_text("alpha: .nan\n")
    line = error_line(["compress", "--config", tmp_path / "c.yaml", "--checkpoint", dense, "--out",
                           tmp_path / "c.kse"])
    assert line == f"kse compress: error: config file {tmp_path / 'c.yaml'}: alpha must be a finite number, got nan"


def test_input_size_zero_is_refused_not_replaced():
    """--input-size 0 became 32 (the default) without a word."""
    line = error_line(["train", "--dataset", "fake", "--input-size", "0", "--out", "unused"])
    assert line.startswith("kse train: error: argument --input-size: must be an integer >= 1, got '0'")
    with pytest.raises(ValueError, match="input_size must be an integer in \\[1, 4096\\].*got 0"):
        get_dataset("fake", input_size=0)
    assert finite_float("2.5") == 2.5
    with pytest.raises(argparse.ArgumentTypeError, match="must be a number, got 'x'"):
        finite_float("x")


# ----------------------------------------------------------------------------- files
def test_an_edited_file_is_error_line(files, tmp_path):
    _, _, compressed = files
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(compressed), "pt") as f:
        meta, tensors = json.loads(f.metadata()["kse"]), {k: f.get_tensor(k) for k in f.keys()}
    raw = json.dumps(meta)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    save_file(tensors, str(tmp_path / "deep.kse"), metadata={"kse": raw})
    line = error_line(["eval", "--checkpoint", tmp_path / "deep.kse"])
    assert line.startswith("kse eval: error: --checkpoint: ") and "nested too deeply" in line
    meta["format_version"] = "1"
    save_file(tensors, str(tmp_path / "v.kse"), metadata={"kse": json.dumps(meta)})
    line = error_line(["eval", "--checkpoint", tmp_path / "v.kse"])
    assert "'format_version' must be an integer >= 1, got '1'" in line and "newer" not in line


def _full_disk(monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def save_file(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("command", ["compress", "deploy", "train"])
def test_a_full_disk_is_error_line(files, tmp_path, monkeypatch, command):
    _, dense, compressed = files
    argv = {"compress": ["compress", "--checkpoint", dense, "--out", tmp_path / "out.kse"],
            "deploy": ["deploy", "--checkpoint", compressed, "--out", tmp_path / "out.kse", "--batch-size", "1",
                       "--repeats", "1"],
            "train": ["train", "--dataset", "fake", "--arch", "resnet20", "--input-size", "16", "--fake-size", "16",
                      "--epochs", "1", "--max-steps", "1", "--batch-size", "8", "--device", "cpu", "--out",
                      tmp_path / "out"]}[command]
    _full_disk(monkeypatch)
    line = error_line(argv)
    target = tmp_path / ("out/last.ckpt" if command == "train" else "out.kse")
    assert line == f"kse {command}: error: cannot write {target}: No space left on device"
    assert not target.exists()


def test_eval_of_a_model_with_non_finite_outputs_is_an_error(files, tmp_path):
    """It printed a NaN loss and exited 0."""
    _, dense, _ = files
    model = kse.load(dense)
    with torch.no_grad():
        model.bn1.running_mean.fill_(float("nan"))  # as a diverged run left it
    kse.save(model, tmp_path / "bad.kse")
    line = error_line(["eval", "--checkpoint", tmp_path / "bad.kse", "--fake-size", "32", "--repeats", "1",
                           "--warmup", "1"])
    assert line.startswith("kse eval: error: the model's outputs hold NaN or Inf for 8 of 8 images")


def test_kse_warnings_are_one_line_and_others_keep_their_form(monkeypatch, run, tmp_path):
    import warnings

    import kse.budget
    import kse.cli.compress as cli_compress

    def command(args):
        warnings.warn_explicit("a note\nover two lines", RuntimeWarning, kse.budget.__file__, 1)
        warnings.warn_explicit("from elsewhere", FutureWarning, torch.__file__, 1)
        return 0

    monkeypatch.setattr(cli_compress, "cmd_analyze", command)
    with pytest.warns(FutureWarning, match="from elsewhere"):  # passed on to the usual display
        code, _, err = run(["analyze", "--checkpoint", tmp_path / "none.kse"])
    assert code == 0
    assert err.strip().splitlines() == ["kse analyze: warning: a note over two lines"]
