"""Commands find a file's input size in its preprocessing, else in the KSEConfig it was
compressed with: `kse export` of a model saved by `kse.save` without `preprocess`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import kse
from kse.cli.common import CLIError, checkpoint_input_size
from kse.deploy import known_input_size
from kse.models import get_model

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread for the module


def test_export_of_a_file_saved_without_preprocess_uses_the_kse_config(tmp_path, ok):
    model = get_model("resnet20", num_classes=10, in_channels=1).eval()
    kse.compress_(model, kse.KSEConfig(G=4, input_size=(1, 16, 16)))
    path = tmp_path / "saved.kse"
    kse.save(model, path)
    loaded = kse.load(path)
    assert not (loaded.kse_preprocess or {}).get("input_size")  # only the config knows it
    assert loaded.kse_config["input_size"] == [1, 16, 16]
    out, _ = ok(["export", "--checkpoint", path, "--out", tmp_path / "ex", "--format", "torchscript", "--form", "full"])
    assert "wrote" in out and (tmp_path / "ex" / "model.ts.pt").is_file()
    assert json.loads((tmp_path / "ex" / "export.json").read_text())["input_size"] == [1, 16, 16]


def test_preprocessing_comes_first():
    model = SimpleNamespace(kse_preprocess={"input_size": [3, 32, 32]}, kse_config={"input_size": [1, 16, 16]})
    assert checkpoint_input_size(model, Path("m.kse")) == (3, 32, 32)
    model = SimpleNamespace(kse_preprocess={"dataset": "fake"}, kse_config={"G": 4, "input_size": [1, 16, 16]})
    assert checkpoint_input_size(model, Path("m.kse")) == (1, 16, 16)


def test_no_input_size_anywhere_is_one_clear_error(tmp_path, one_error_line):
    path = tmp_path / "dense.kse"
    kse.save(get_model("resnet20", num_classes=10), path)
    line = one_error_line(["export", "--checkpoint", path, "--out", tmp_path / "ex"])
    assert line == (f"kse export: error: {path} records no input size (neither preprocess.input_size nor the "
                    "input_size of the KSEConfig it was compressed with); re-save it with kse.save(..., "
                    "preprocess={'input_size': [C, H, W], ...})")


@pytest.mark.parametrize("size", [[0, 16, 16], [1, 16], [1, 16.5, 16], "1x16x16", [True, 16, 16]])
def test_a_malformed_input_size_is_one_clear_error(size):
    for model in (SimpleNamespace(kse_preprocess={"input_size": size}, kse_config=None),
                  SimpleNamespace(kse_preprocess=None, kse_config={"input_size": size})):
        with pytest.raises(CLIError, match=r"m.kse: the recorded input size is not three positive integers"):
            checkpoint_input_size(model, Path("m.kse"))
        with pytest.raises(ValueError, match=r"^the recorded input size is not three positive integers"):
            known_input_size(model)
