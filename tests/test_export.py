"""kse.export: pt2, ONNX and TorchScript files written, checked against eager PyTorch, atomically."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import kse
import kse.export as kx

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")


def _deployed(tiny_kse, form: str = "split") -> nn.Module:
    net = tiny_kse()
    kse.deploy_(net, form=form)
    return net


def _batch(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(n))


def test_max_rel_diff_is_relative_to_the_largest_output():
    ref = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    out = ref.clone()
    out[1, 0] += 0.2
    assert kx.max_rel_diff(out, ref) == pytest.approx(0.2 / 4.0)
    assert kx.max_rel_diff(ref, ref) == 0.0


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_model_writes_files_that_match_eager(tmp_path, fmt, tiny_kse):
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")  # the torch.export-based exporter
    net = _deployed(tiny_kse, "split")
    layers = sum(isinstance(m, kse.KSEConv2d) for m in net.modules())
    written = []
    manifest = kx.export_model(net, tmp_path, [fmt], input_size=(1, 16, 16), header={"checkpoint": "x.kse"},
                               on_written=lambda f, entry: written.append((f, entry)))
    target = tmp_path / kx.FORMATS[fmt]
    assert [f for f, _ in written] == [fmt] and written[0][1]["file"] == str(target)
    assert written[0][1]["check_batch"] == 3  # batch_size + 2: the batch axis is dynamic
    assert json.loads((tmp_path / "export.json").read_text()) == json.loads(json.dumps(manifest))
    assert list(manifest)[:2] == ["checkpoint", "arch"] and manifest["batchnorm_folded"] is True
    assert manifest["forms"] == {"split": layers}
    entry = manifest["exports"][fmt]
    assert entry["max_rel_diff"] <= 1e-4
    # ONNX gets zero kernels for the dropped channels; TorchScript keeps the deployed form
    assert entry["forms"] == ({"full": layers} if fmt == "onnx" else {"split": layers})
    # checked again here, on a batch size the export never saw
    x = _batch(5)
    with torch.no_grad():
        ref = net(x)
        if fmt == "onnx":
            got = torch.from_numpy(ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
                                   .run(None, {"input": x.numpy()})[0])
        else:
            got = torch.jit.load(str(target))(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("fold", [True, False])
def test_export_model_folds_batchnorm_unless_told_not_to(tmp_path, fold, tiny_kse):
    manifest = kx.export_model(_deployed(tiny_kse), tmp_path, ["torchscript"], input_size=(1, 16, 16), fold=fold)
    assert manifest["batchnorm_folded"] is fold
    kinds = {m.original_name for m in torch.jit.load(str(tmp_path / "model.ts.pt")).modules()}
    assert ("BatchNorm2d" in kinds) is not fold


class _DataDependent(nn.Module):
    """torch.fx cannot trace it (a branch on a tensor's value), so BatchNorm cannot be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if bool(x.sum() > -1e9) else -y


def test_export_model_notes_a_model_it_cannot_fold(tmp_path):
    notes = []
    manifest = kx.export_model(_DataDependent().eval(), tmp_path, ["torchscript"], input_size=(1, 8, 8),
                               on_note=notes.append)
    assert len(notes) == 2 and notes[0].startswith("note: BatchNorm not folded (cannot fold BatchNorm")
    assert notes[1] == "TorchScript: torch.jit.trace, then a check of the reloaded file"  # progress
    assert manifest["batchnorm_folded"] is False and manifest["exports"]["torchscript"]["max_rel_diff"] <= 1e-4


def test_mismatch_raises_and_leaves_no_file(tmp_path, monkeypatch, tiny_kse):
    monkeypatch.setattr(kx, "max_rel_diff", lambda out, ref: 0.5)
    net = _deployed(tiny_kse)
    x = _batch(3)
    with torch.no_grad():
        ref = net(x)
    with pytest.raises(kx.ExportError, match=r"torchscript export does not match PyTorch: max relative "
                                             r"difference 0.5 > 0.0001 \(nothing written\)"):
        kx.export_verified(net, "torchscript", tmp_path / "model.ts.pt", _batch(1), x, ref)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary
    # through export_model, a manifest from an earlier call does not outlive the failure
    (tmp_path / "export.json").write_text("{}")
    with pytest.raises(kx.ExportError, match="does not match PyTorch"):
        kx.export_model(net, tmp_path, ["torchscript"], input_size=(1, 16, 16))
    assert list(tmp_path.iterdir()) == []


def test_a_failing_export_is_one_line_and_leaves_no_file(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("no forward here\nsecond line")

    x = _batch(1)
    with pytest.raises(kx.ExportError, match=r"^TorchScript export failed: RuntimeError: no forward here$"):
        kx.export_verified(Broken(), "torchscript", tmp_path / "model.ts.pt", x, x, x)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(kx.ExportError, match=r"^pt2 \(AOTInductor\) export failed: .*no forward here$"):
        kx.export_verified(Broken(), "pt2", tmp_path / "model.pt2", _batch(2), x, x)  # torch.export: no hint
    assert list(tmp_path.iterdir()) == []


def test_a_different_output_shape_is_infinitely_far(tmp_path):
    net = nn.Flatten().eval()
    x = _batch(2)
    assert kx.export_and_check(net, "torchscript", tmp_path / "m.ts.pt", x, x, torch.zeros(2, 3)) == float("inf")


@pytest.mark.parametrize("forms, fmt, form, expected", [
    ({"a": "split", "b": "fused"}, "torchscript", "auto", {"a": "split", "b": "fused"}),
    ({"a": "split", "b": "fused"}, "onnx", "auto", {"a": "full", "b": "full"}),
    ({"a": "split", "b": "fused@1,dense@64"}, "onnx", "split", {"a": "split", "b": "full@1,dense@64"}),
    ({"a": "split", "b": "fused@1,dense@64"}, "pt2", "auto", {"a": "split", "b": "fused@1,dense@64"}),
])
def test_forms_for_format(forms, fmt, form, expected):
    assert kx.forms_for_format(forms, fmt, form) == expected


def test_bad_arguments(tmp_path, tiny_kse):
    net = _deployed(tiny_kse)
    with pytest.raises(ValueError, match="unknown export format 'tflite'; choose one of: pt2, onnx, torchscript"):
        kx.export_model(net, tmp_path, ["tflite"], input_size=(1, 16, 16))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        kx.export_model(net, tmp_path, ["torchscript"], input_size=(1, 16, 16), batch_size=0)
    assert list(tmp_path.iterdir()) == []


def _fused_layers(net: nn.Module) -> int:
    return sum("fused" in m.form for m in net.modules() if isinstance(m, kse.KSEConv2d))


needs_fused = pytest.mark.skipif(not kse.fused.available(), reason="the fused kernel does not build here")


@needs_fused
def test_pt2_keeps_the_fused_operator_with_torch_export_standing_in_for_aotinductor(tmp_path, monkeypatch, tiny_kse,
                                                                                   assert_same_function):
    # AOTInductor's C++ compilation is slow (the next test runs it, on this tiny model): here the
    # exported program is saved and loaded as it is, which checks what goes into the package
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda program, package_path: torch.export.save(program, package_path))
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path: torch.export.load(path).module())
    net = _deployed(tiny_kse, "fused@1,full@8")  # a form per batch size: pt2 gets the forms of batch_size
    manifest = kx.export_model(net, tmp_path, ["pt2"], input_size=(1, 16, 16), batch_size=1)
    fused_layers = _fused_layers(kse.fold_batchnorm(net))
    assert manifest["exports"]["pt2"]["forms"] == {"fused": fused_layers, "dense": 18 - fused_layers}
    assert "kse.ops.load_library()" in manifest["pt2_needs"] and "torchscript_needs" not in manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.json", "model.pt2"]  # no temporary left
    program = torch.export.load(tmp_path / "model.pt2")
    assert str(program.graph).count("kse.fused_conv.default") == fused_layers
    with torch.no_grad():
        for b in (1, 4):  # traced at two rows, the batch axis is dynamic from 1 on
            x = _batch(b)
            assert_same_function(program.module()(x), net(x), 1e-4)


@needs_fused
def test_pt2_package_runs_the_fused_operator(tmp_path, tiny_kse, assert_same_function, fresh_interpreter):
    net = _deployed(tiny_kse, "fused")
    manifest = kx.export_model(net, tmp_path, ["pt2"], input_size=(1, 16, 16), batch_size=1)
    assert manifest["exports"]["pt2"]["max_rel_diff"] <= 1e-4
    assert manifest["exports"]["pt2"]["forms"]["fused"] == _fused_layers(kse.fold_batchnorm(net))
    package = torch._inductor.aoti_load_package(str(tmp_path / "model.pt2"))
    with torch.no_grad():
        for b in (1, 6):
            x = _batch(b)
            assert_same_function(package(x), net(x), 1e-4)
        x = _batch(3)
        ref = net(x)
    # a fresh interpreter: the package needs the operator library, and runs once it is loaded
    refused, diff = fresh_interpreter("torch._inductor.aoti_load_package", tmp_path / "model.pt2", x, ref, tmp_path)
    assert refused and diff < 1e-4


def test_a_failed_compilation_says_what_aotinductor_needs(tmp_path, monkeypatch, tiny_kse):
    def no_compiler(program, package_path):
        raise RuntimeError("cc1plus: not found\nmore")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    net = _deployed(tiny_kse, "full")
    with pytest.raises(kx.ExportError, match=r"^pt2 \(AOTInductor\) export failed: AOTInductor could not compile the "
                                             r"exported program \(RuntimeError: cc1plus: not found\); it needs a C\+\+ "
                                             r"compiler and a writable cache: install one, or pass --format onnx or "
                                             r"torchscript$"):
        kx.export_model(net, tmp_path, ["pt2"], input_size=(1, 16, 16))
    assert list(tmp_path.iterdir()) == []
