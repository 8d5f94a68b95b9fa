"""`kse train` on the command line: one-line errors, YAML defaults, resolved arguments."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch

import kse
from kse.cli import main


def _run_cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "kse.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# ----------------------------------------------------------------------------- as a process
def test_unknown_arch_exits_2_with_one_line(tmp_path):
    proc = _run_cli("train", "--arch", "resnet7", "--dataset", "fake", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert line.startswith("kse train: error: --arch: unknown model 'resnet7'; choose one of: ")
    assert "resnet20" in line and "resnet56" in line
    assert not (tmp_path / "out").exists()  # failed before writing anything


def test_missing_config_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    proc = _run_cli("train", "--config", str(missing), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2
    assert _one_error_line(proc.stderr) == f"kse train: error: config file not found: {missing}"


# ----------------------------------------------------------------------------- in process
@pytest.fixture
def single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    torch.set_num_threads(1)


@pytest.fixture
def export_stub(monkeypatch):
    """Stand-in for kse.serialization.save that records its call (the file format is tested elsewhere)."""
    calls = []

    def save(model, path, preprocess=None, **kwargs):
        calls.append((model, path, preprocess))
        path.write_bytes(b"stub")

    stub = types.ModuleType("kse.serialization")
    stub.save = save
    monkeypatch.setitem(sys.modules, "kse.serialization", stub)
    monkeypatch.setattr(kse, "serialization", stub, raising=False)
    return calls


def test_yaml_config_sets_defaults_and_args_are_saved(tmp_path, capsys, single_process, export_stub):
    config = tmp_path / "recipe.yaml"
    config.write_text("arch: resnet20\ndataset: fake\ninput-size: 16\nfake_size: 16\nbatch_size: 4\n"
                      "max_steps: 1\nepochs: 2\nlr: 0.5\ndevice: cpu\nchannels-last: false\n")
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--lr", "0.02", "--out", str(out)]) == 0

    saved = json.loads((out / "args.json").read_text())
    assert saved["epochs"] == 2 and saved["batch_size"] == 4 and saved["input_size"] == 16  # from the YAML
    assert saved["lr"] == 0.02  # the command line wins over the YAML
    assert saved["schedule"] == "cosine" and saved["weight_decay"] == 5e-4  # built-in defaults
    assert saved["channels_last"] is False and saved["config"] == str(config)
    assert "func" not in saved

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["test_count"] == 8 for r in rows)
    assert (out / "last.ckpt").is_file()

    assert len(export_stub) == 1
    model, path, preprocess = export_stub[0]
    assert path == out / "model.kse" and path.read_bytes() == b"stub"
    assert model.kse_arch["name"] == "resnet20" and not isinstance(model, torch.nn.parallel.DistributedDataParallel)
    assert preprocess["dataset"] == "fake" and preprocess["input_size"] == [3, 16, 16]
    assert f"wrote {out / 'model.kse'}" in capsys.readouterr().out


@pytest.mark.parametrize("config_text, match", [
    ("epoch: 3\n", r"unknown key 'epoch'"),
    ("- 1\n- 2\n", r"must hold a mapping of flag names to values"),
    ("lr: [0.1\n", r"is not valid YAML"),
])
def test_bad_config_files(tmp_path, capsys, single_process, config_text, match):
    config = tmp_path / "bad.yaml"
    config.write_text(config_text)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"kse train: error: config file {config}")
    assert re.search(match, line)


@pytest.mark.parametrize("argv, match", [
    (["--lr", "-1"], "kse train: error: lr must be a positive number, got -1.0"),
    (["--epochs", "0"], "kse train: error: epochs must be an integer >= 1, got 0"),
    (["--dataset", "cifar11"], "kse train: error: unknown dataset 'cifar11'; choose one of: "),
    (["--device", "tpu9"], "kse train: error: --device: unknown device 'tpu9'; use cpu or cuda[:N]"),
])
def test_bad_values_are_one_line_errors(tmp_path, capsys, single_process, argv, match):
    base = ["train", "--arch", "resnet20", "--dataset", "fake", "--device", "cpu", "--out", str(tmp_path / "out")]
    assert main(base + argv) == 2
    assert _one_error_line(capsys.readouterr().err).startswith(match)
    assert not (tmp_path / "out" / "last.ckpt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path, capsys, single_process):
    assert main(["train", "--dataset", "fake", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available on this machine; use --device cpu" in _one_error_line(capsys.readouterr().err)
