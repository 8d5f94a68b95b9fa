"""`kse` subcommands end to end on FakeData (16 px, resnet20, a few steps):
train -> analyze -> compress -> finetune -> eval -> export -> bench -> demo, and their
one-line errors."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import kse
import kse.export
from kse.cli import demo as cli_demo
from kse.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread for the module

TINY = ["--device", "cpu"]


# ----------------------------------------------------------------------------- artifacts
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def baseline(work, ok):
    ok(["train", "--dataset", "fake", "--arch", "resnet20", "--input-size", 16, "--fake-size", 32, "--epochs", 1,
        "--max-steps", 2, "--batch-size", 8, "--no-channels-last", "--out", work / "base", *TINY])
    path = work / "base" / "model.kse"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def compressed(work, baseline, ok):
    path = work / "compressed.kse"
    out, err = ok(["compress", "--checkpoint", baseline, "--out", path, "--G", 4])
    assert path.is_file()
    return path, out


@pytest.fixture(scope="module")
def finetuned(work, compressed, ok):
    out_dir = work / "ft"
    ok(["finetune", "--checkpoint", compressed[0], "--out", out_dir, "--epochs", 1, "--max-steps", 2,
        "--batch-size", 8, "--fake-size", 32, *TINY])
    return out_dir


# ----------------------------------------------------------------------------- commands
@pytest.mark.parametrize("command", ["models", "analyze", "compress", "explain", "finetune", "eval", "export", "bench",
                                     "deploy", "demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"usage: kse {command}" in capsys.readouterr().out


ALL_COMMANDS = ["train", "models", "analyze", "compress", "prune-l1", "prune", "explain", "finetune", "eval", "bench",
                "deploy", "export", "demo"]


def test_parser_registers_every_command_and_the_docstring_lists_them():
    import kse.cli
    from kse.cli import build_parser

    parser = build_parser()
    assert sorted(parser.commands) == sorted(ALL_COMMANDS)
    for name in ALL_COMMANDS:
        assert f"    kse {name} " in kse.cli.__doc__, name
        sub = parser.commands[name]
        # every built-in default fills a flag of its command (a misspelt key would never be used)
        assert set(sub.defaults) <= set(sub.flags), (name, set(sub.defaults) - set(sub.flags))
        assert ("config" in sub.flags) is (name != "models")


def test_cli_package_uses_no_argparse_internals():
    import kse.cli

    from pathlib import Path

    sources = sorted(Path(kse.cli.__file__).parent.glob("*.py"))
    assert len(sources) >= 8
    for path in sources:
        text = path.read_text()
        for private in ("._actions", "._subparsers", "._group_actions", "._option_string_actions", "._defaults"):
            assert private not in text, f"{path.name} uses argparse's {private}"


def test_models_lists_registered_names(ok):
    out, _ = ok(["models"])
    names = out.split()
    assert names == sorted(names)
    assert {"resnet20", "resnet56", "densenet40"} <= set(names)


def test_analyze_table_json_and_plot(work, baseline, ok):
    out, _ = ok(["analyze", "--checkpoint", baseline])
    lines = out.splitlines()
    assert lines[1].split() == ["layer", "C_in", "N", "kept", "centroids", "ratio", "v_min", "v_mean", "v_max"]
    names = [line.split()[0] for line in lines[3:21]]
    assert names[0] == "layer1.0.conv1" and names[-1] == "layer3.2.conv2"
    assert "conv1" not in names  # the stem conv is never planned
    assert "total: 18 layers" in lines[21]

    report_dir = work / "analysis"
    out, _ = ok(["analyze", "--checkpoint", baseline, "--out", report_dir, "--json", "--G", 5])
    data = json.loads(out)  # --json prints exactly one JSON object
    assert data["config"]["G"] == 5 and len(data["planned"]) == 18
    plans = kse.plan(kse.load(baseline), kse.KSEConfig(G=5, input_size=(3, 16, 16)))
    for row, p in zip(data["planned"], plans):
        assert (row["name"], row["kept"], row["centroids"]) == (p.name, p.kept, p.centroids)
        assert 0.0 == row["indicator_min"] <= row["indicator_mean"] <= row["indicator_max"] == 1.0
        assert row["ratio"] == pytest.approx(p.out_channels * p.in_channels / p.centroids)
    assert json.loads((report_dir / "analysis.json").read_text())["planned"] == data["planned"]
    assert (report_dir / "analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((report_dir / "args.json").read_text())["G"] == 5


def test_analyze_of_a_compressed_checkpoint_lists_its_layers(compressed, ok):
    out, _ = ok(["analyze", "--checkpoint", compressed[0]])
    assert "KSE layers already in the model" in out and "form" in out


def test_compress_prints_plan_and_profiles(baseline, compressed):
    path, out = compressed
    assert "layer3.2.conv2" in out and f"wrote {path}" in out
    assert "params" in out and "MACs" in out
    model, base = kse.load(path), kse.load(baseline)
    layers = [m for m in model.modules() if isinstance(m, kse.KSEConv2d)]
    assert len(layers) == 18
    assert model.kse_preprocess == base.kse_preprocess and model.kse_config["G"] == 4
    assert model.kse_config["input_size"] == [3, 16, 16]
    after, before = kse.profile(model, (3, 16, 16)), kse.profile(base, (3, 16, 16))
    assert after.macs < before.macs and after.params < before.params
    assert model.kse_extra["baseline"] == {"params": before.params, "macs": before.macs}
    args = json.loads((path.parent / "compressed.args.json").read_text())
    assert args["G"] == 4 and args["T"] == 0


def test_finetune_trains_centroids_keeps_structure_and_resumes(compressed, finetuned, ok):
    before, after = kse.load(compressed[0]), kse.load(finetuned / "model.kse")
    assert after.kse_preprocess == before.kse_preprocess and after.kse_config == before.kse_config
    pairs = [(a, b) for a, b in zip(before.modules(), after.modules()) if isinstance(a, kse.KSEConv2d)]
    assert len(pairs) == 18
    for a, b in pairs:
        assert torch.equal(a.assignment, b.assignment) and torch.equal(a.kept_channels, b.kept_channels)
    assert any(not torch.equal(a.centroids, b.centroids) for a, b in pairs)  # the centroids were trained
    args = json.loads((finetuned / "args.json").read_text())
    assert (args["lr"], args["weight_decay"], args["schedule"]) == (0.01, 1e-5, "multistep")  # docs/method.md §6

    ok(["finetune", "--checkpoint", compressed[0], "--out", finetuned, "--epochs", 2, "--max-steps", 2,
        "--batch-size", 8, "--fake-size", 32, "--resume", *TINY])
    rows = [json.loads(line) for line in (finetuned / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # epoch 1 came from last.ckpt


def test_finetune_says_when_it_loads_the_training_extension(work, compressed, monkeypatch, ok):
    from kse import fused

    argv = ["finetune", "--checkpoint", compressed[0], "--epochs", 1, "--max-steps", 1, "--batch-size", 8,
            "--fake-size", 16, *TINY]
    monkeypatch.setattr(fused, "loaded", lambda: False)  # as in a fresh process
    _, err = ok([*argv, "--out", work / "ft-ext1"])
    assert "loading the compiled kse operators for CPU training steps" in err
    monkeypatch.setattr(fused, "loaded", lambda: True)  # already loaded: nothing to say
    _, err = ok([*argv, "--out", work / "ft-ext2"])
    assert "compiled extension" not in err
    monkeypatch.setattr(fused, "available", lambda: False)  # no compiler: the stock operations, said once
    monkeypatch.setattr(fused, "build_error", lambda: "no compiler here")
    _, err = ok([*argv, "--out", work / "ft-ext3"])
    assert "note: no compiled extension (no compiler here); W' is built with stock operations" in err
    assert (work / "ft-ext3" / "model.kse").is_file()


def test_eval_json(baseline, finetuned, ok):
    results = {}
    for name, path in (("base", baseline), ("kse", finetuned / "model.kse")):
        out, _ = ok(["eval", "--checkpoint", path, "--json", "--repeats", 3, "--warmup", 1, "--max-batches", 1, *TINY])
        results[name] = json.loads(out)
    for r in results.values():
        assert {"top1", "top5", "params", "macs", "latency_ms", "file_bytes"} <= set(r)
        assert 0 <= r["top1"] <= r["top5"] <= 100
        assert r["latency_ms"] > 0 and r["params"] > 0 and r["count"] > 0
    assert results["kse"]["macs"] < results["base"]["macs"]
    assert results["kse"]["params"] < results["base"]["params"]
    assert results["kse"]["kse_layers"] == 18 and sum(results["kse"]["forms"].values()) == 18
    assert results["base"]["kse_layers"] == 0


def test_eval_human_output(finetuned, ok):
    out, _ = ok(["eval", "--checkpoint", finetuned, "--repeats", 2, "--warmup", 0, "--max-batches", 1])
    assert "top-1" in out and "ms/image" in out and "18 KSE layers" in out  # a folder means its model.kse


def _verified_manifest(out: str, out_dir, formats: set, compiled: str) -> dict:
    """export.json of a `kse export` run: the formats asked for, each within 1e-4 of PyTorch, the
    18 KSE layers in the file of the format ``compiled`` (which keeps the fused kernel), and the
    note on loading the operator library where a layer is fused."""
    manifest = json.loads((out_dir / "export.json").read_text())
    assert set(manifest["exports"]) == formats
    assert all(v["max_rel_diff"] <= 1e-4 for v in manifest["exports"].values())
    assert sum(manifest["exports"][compiled]["forms"].values()) == 18
    if "fused" in manifest["exports"][compiled]["forms"]:
        assert "kse.ops.load_library()" in out and f"{compiled}_needs" in manifest
    return manifest


def _unseen_batch(finetuned):
    """A batch size no export saw, and the model's outputs on it in PyTorch."""
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        return x, kse.load(finetuned / "model.kse")(x)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_writes_verified_onnx_and_torchscript(work, finetuned, ok):
    ort = pytest.importorskip("onnxruntime")
    out_dir = work / "export"
    # (the default formats, pt2 and onnx: test_export_default_formats, slow: AOTInductor compiles for minutes)
    out, _ = ok(["export", "--checkpoint", finetuned / "model.kse", "--out", out_dir, "--format", "onnx",
                 "torchscript"])
    onnx_file, ts_file = out_dir / "model.onnx", out_dir / "model.ts.pt"
    assert f"wrote {onnx_file} (verified" in out and f"wrote {ts_file} (verified" in out
    manifest = _verified_manifest(out, out_dir, {"onnx", "torchscript"}, compiled="torchscript")
    # default form auto: measured forms (the compiled kernel among them) for TorchScript, zero
    # kernels for dropped channels for onnxruntime
    assert manifest["exports"]["onnx"]["forms"] == {"full": 18} and manifest["batch_size"] == 1
    assert manifest["batchnorm_folded"] is True  # by default, into the convolutions
    onnx = pytest.importorskip("onnx")
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(onnx_file)).graph.node}
    x, ref = _unseen_batch(finetuned)
    got = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(ts_file))(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_export_default_formats(work, finetuned, ok):
    pytest.importorskip("onnxscript")
    out_dir = work / "export-default"
    out, _ = ok(["export", "--checkpoint", finetuned / "model.kse", "--out", out_dir])
    _verified_manifest(out, out_dir, {"pt2", "onnx"}, compiled="pt2")
    assert not (out_dir / "model.ts.pt").exists()
    x, ref = _unseen_batch(finetuned)
    with torch.no_grad():
        got = torch._inductor.aoti_load_package(str(out_dir / "model.pt2"))(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_export_onnx_without_onnxscript_is_one_line(work, finetuned, monkeypatch, one_error_line):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript raises ImportError
    line = one_error_line(["export", "--checkpoint", finetuned, "--out", work / "export-no-onnxscript"])
    assert "ONNX export needs onnxscript" in line and "pip install 'kse[export]' or pass --format pt2 torchscript" in line


def test_export_mismatch_is_an_error_and_removes_the_file(work, finetuned, monkeypatch, one_error_line):
    monkeypatch.setattr(kse.export, "max_rel_diff", lambda out, ref: 0.5)
    out_dir = work / "export-bad"
    line = one_error_line(["export", "--checkpoint", finetuned, "--out", out_dir, "--format", "torchscript",
                           "--form", "full"])
    assert "does not match PyTorch: max relative difference 0.5 > 0.0001" in line
    assert not (out_dir / "model.ts.pt").exists()
    assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".model")]  # no temporary file left


def test_bench_json(finetuned, ok):
    out, _ = ok(["bench", "--checkpoint", finetuned, "--batch-size", 1, 2, "--repeats", 2, "--warmup", 0, "--json"])
    data = json.loads(out)
    assert [r["batch_size"] for r in data["results"]] == [1, 2]
    for res in data["results"]:
        assert len(res["layers"]) == 18
        for row in res["layers"]:
            assert min(row["conv_ms"], row["dense_ms"], row["split_ms"]) > 0
            assert row["best"] in ("dense", "split")
            assert row["dense_speedup"] == pytest.approx(row["conv_ms"] / row["dense_ms"])
        model = res["model"]
        assert model["speedup"] == pytest.approx(model["dense_ms"] / model["kse_ms"])
        assert sum(model["forms"].values()) == 18


def test_bench_table(finetuned, ok):
    out, _ = ok(["bench", "--checkpoint", finetuned, "--batch-size", 1, "--repeats", 1, "--warmup", 0])
    assert "conv/split" in out and "whole model: dense baseline" in out


def test_demo_on_a_fake_checkpoint(work, baseline, ok):
    out_dir = work / "demo"
    out, err = ok(["demo", "--checkpoint", baseline, "--out", out_dir, "--finetune-steps", 3, "--batch-size", 8,
                   "--fake-size", 32, "--repeats", 2, "--recalibrate", 2, *TINY])
    assert all(f"[{i}/8]" in err for i in range(1, 9))  # progress on stderr
    assert "CPU latency, batch 64 (ms)" in out
    report = json.loads((out_dir / "report.json").read_text())
    assert report["dataset"] == "fake"  # the dataset recorded in the checkpoint
    base, comp = report["baseline"], report["compressed"]
    assert comp["macs"] < base["macs"] and comp["params"] < base["params"]
    assert comp["file_bytes"] < base["file_bytes"]
    # top-1 right after compression, after recalibration, after fine-tuning: one row each, in that order
    rows = [line.split() for line in out.splitlines() if line.startswith("top-1 (%)")]
    labels = [" ".join(r[2:-4]) for r in rows]
    assert labels == ["right after compression", "BatchNorm recalibrated (2 batches)", "fine-tuned (3 steps)"]
    keys = ["top1_after_compression", "top1_after_recalibration", "top1"]
    for r, key in zip(rows, keys):
        assert float(r[-4]) == pytest.approx(base["top1"], abs=0.006)
        assert float(r[-3]) == pytest.approx(comp[key], abs=0.006) and 0 <= comp[key] <= 100
        assert float(r[-2]) == pytest.approx(comp[key] - base["top1"], abs=0.011)
    assert comp["recalibration"] == {"batches": 2, "batch_size": 8, "dataset": "fake", "split": "train",
                                     "augmentation": False, "order_seed": 0, "batchnorm_layers": 19}
    assert set(comp["latency_ms"]) == {"1", "64"} and all(v > 0 for v in comp["latency_ms"].values())
    # and both models with BatchNorm folded, as exported
    assert "CPU latency, batch 1, BatchNorm folded (ms)" in out
    assert set(comp["latency_folded_ms"]) == set(base["latency_folded_ms"]) == {"1", "64"}
    # and the folded baseline in channels_last, compared with the same folded KSE model
    assert set(base["latency_folded_channels_last_ms"]) == {"1", "64"}
    row = next(line for line in out.splitlines() if "batch 1, folded, baseline channels_last (ms)" in line).split()
    assert float(row[-3]) == pytest.approx(base["latency_folded_channels_last_ms"]["1"], abs=0.006)
    assert float(row[-2]) == pytest.approx(comp["latency_folded_ms"]["1"], abs=0.006)
    # forms chosen per batch size (the fused kernel among the candidates); every layer runs one at each size
    assert set(comp["forms_by_batch"]) == {"1", "64"}
    assert all(sum(f.values()) == 18 and set(f) <= {"dense", "full", "split", "fused"}
               for f in comp["forms_by_batch"].values())
    assert report["finetune"]["steps"] == 3
    report_md = (out_dir / "report.md").read_text()
    assert "| top-1 (%), BatchNorm recalibrated (2 batches) |" in report_md
    assert "BatchNorm statistics recalibrated on 2 training batches of 8 images" in report_md
    assert (out_dir / "layers.png").read_bytes()[:4] == b"\x89PNG"
    model = kse.load(out_dir / "model.kse")
    assert sum(isinstance(m, kse.KSEConv2d) for m in model.modules()) == 18
    assert model.kse_preprocess == kse.load(baseline).kse_preprocess


# ----------------------------------------------------------------------------- errors
def test_demo_without_a_baseline_says_how_to_make_one(tmp_path, monkeypatch, one_error_line):
    monkeypatch.setattr(cli_demo, "checkpoint_candidates", lambda: [tmp_path / "checkpoints/resnet56-fmnist.kse"])
    line = one_error_line(["demo", "--out", tmp_path / "demo"])
    assert line.startswith(f"kse demo: error: no baseline checkpoint at {tmp_path / 'checkpoints/resnet56-fmnist.kse'}")
    assert "kse train --arch resnet56 --dataset fashion-mnist --out checkpoints/resnet56-fmnist" in line
    assert not (tmp_path / "demo").exists()


def test_demo_default_candidates_are_the_repository_and_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = cli_demo.checkpoint_candidates()
    root = type(tmp_path)(kse.__file__).resolve().parents[2]
    assert found[0] == root / "checkpoints" / "resnet56-fmnist.kse"
    assert tmp_path / "checkpoints" / "resnet56-fmnist.kse" in found


COMMANDS = {
    "analyze": [], "compress": ["--out", "{tmp}/c.kse"], "finetune": ["--out", "{tmp}/ft"], "eval": [],
    "export": ["--out", "{tmp}/ex"], "bench": [], "demo": ["--out", "{tmp}/demo"], "explain": ["--out", "{tmp}/ex"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_missing_checkpoint(command, tmp_path, one_error_line):
    extra = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    line = one_error_line([command, "--checkpoint", tmp_path / "nope.kse", *extra])
    assert line == f"kse {command}: error: --checkpoint: file not found: {tmp_path / 'nope.kse'}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_not_a_kse_file(command, tmp_path, one_error_line):
    bogus = tmp_path / "notes.kse"
    bogus.write_text("this is not a checkpoint\n")
    extra = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    line = one_error_line([command, "--checkpoint", bogus, *extra])
    assert line.startswith(f"kse {command}: error: --checkpoint: {bogus} is not a KSE checkpoint")


def test_training_state_given_as_checkpoint(baseline, one_error_line):
    line = one_error_line(["eval", "--checkpoint", baseline.parent / "last.ckpt"])
    assert "is a training state (last.ckpt), not a model; pass the model.kse written next to it" in line


@pytest.mark.parametrize("command, extra", [("compress", ["--out", "c.kse"]), ("analyze", []), ("demo", [])])
def test_out_of_range_G(command, extra, baseline, tmp_path, monkeypatch, one_error_line):
    monkeypatch.chdir(tmp_path)
    line = one_error_line([command, "--checkpoint", baseline, "--G", 1, *extra])
    assert line == f"kse {command}: error: --G: G must be an integer >= 2, got 1"
    assert not (tmp_path / "c.kse").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, match", [
    (["--alpha", "-1"], "kse compress: error: --alpha: alpha must be a finite number >= 0, got -1.0"),
    (["--T", "-1"], "kse compress: error: --T: T must be an integer >= 0, got -1"),
    (["--channel-multiple", "0"],
     "kse compress: error: --channel-multiple: channel_multiple must be an integer >= 1, got 0"),
    (["--n-init", "0"], "kse compress: error: --n-init: n_init must be an integer >= 1, got 0"),
])
def test_other_bad_kse_values(argv, match, baseline, tmp_path, one_error_line):
    assert one_error_line(["compress", "--checkpoint", baseline, "--out", tmp_path / "c.kse", *argv]) == match


def test_compress_channel_multiple_sets_the_widths(baseline, tmp_path, ok):
    out = tmp_path / "every-dead-channel.kse"
    ok(["compress", "--checkpoint", baseline, "--out", out, "--channel-multiple", 1])
    got = kse.load(out)
    assert got.kse_config["channel_multiple"] == 1
    want = kse.compress(kse.load(baseline), kse.KSEConfig(G=4, channel_multiple=1, input_size=(3, 16, 16)))
    widths = [(n, m.in_channels, m.out_channels) for n, m in got.named_modules() if hasattr(m, "out_channels")]
    assert widths == [(n, m.in_channels, m.out_channels) for n, m in want.named_modules() if hasattr(m, "out_channels")]
    default = kse.compress(kse.load(baseline), kse.KSEConfig(G=4, input_size=(3, 16, 16)))
    assert sum(w[2] for w in widths) < sum(m.out_channels for m in default.modules() if hasattr(m, "out_channels"))


def test_compress_refuses_to_overwrite_its_input(baseline, one_error_line):
    line = one_error_line(["compress", "--checkpoint", baseline, "--out", baseline])
    assert line == "kse compress: error: --out must differ from --checkpoint (the baseline would be overwritten)"


def test_compress_n_init_reaches_the_config(baseline, tmp_path, ok):
    ok(["compress", "--checkpoint", baseline, "--out", tmp_path / "c.kse", "--G", 4, "--n-init", 3])
    assert kse.load(tmp_path / "c.kse").kse_config["n_init"] == 3


def test_compress_of_a_compressed_checkpoint(compressed, tmp_path, one_error_line):
    line = one_error_line(["compress", "--checkpoint", compressed[0], "--out", tmp_path / "again.kse"])
    assert "already KSE-compressed" in line


def test_deploy_records_measured_forms_in_the_file(work, compressed, monkeypatch, ok, one_error_line):
    import kse
    import kse.deploy as deploy_mod
    from kse.conv import KSEConv2d

    # a fake clock: split is fastest at batch 1, full at batch 4 (the real choice depends on the machine)
    fake = {("split", 1): 1.0, ("dense", 1): 2.0, ("full", 1): 3.0, ("split", 4): 9.0, ("dense", 4): 5.0, ("full", 4): 4.0}
    monkeypatch.setattr(deploy_mod, "time_call", lambda m, x, warmup, repeats: {"min_ms": fake[(m.form, x.shape[0])]})
    out_file = work / "deployed.kse"
    out, _ = ok(["deploy", "--checkpoint", compressed[0], "--out", out_file, "--batch-size", 4, 1, "--repeats", 1])
    assert "split@1,full@4 x" in out and f"wrote {out_file}" in out
    monkeypatch.setattr(deploy_mod, "time_call", None)  # loading must not measure
    model = kse.load(out_file)
    assert {m.form for m in model.modules() if isinstance(m, KSEConv2d)} == {"split@1,full@4"}
    assert "must differ from --checkpoint" in one_error_line(["deploy", "--checkpoint", compressed[0],
                                                              "--out", compressed[0]])


@pytest.mark.parametrize("command", ["bench", "deploy"])
def test_bench_and_deploy_need_kse_layers(baseline, work, command, one_error_line):
    out = ["--out", work / "never.kse"] if command == "deploy" else []
    line = one_error_line([command, "--checkpoint", baseline, *out])
    assert line.endswith("has no KSE layers; compress it first with `kse compress`")
    assert not (work / "never.kse").exists()


def test_eval_with_a_dataset_that_does_not_fit_the_model(tmp_path, one_error_line):
    from kse.models import get_model

    path = tmp_path / "five.kse"
    kse.save(get_model("resnet20", num_classes=5), path,
             preprocess={"dataset": "fake", "input_size": [3, 16, 16], "num_classes": 5})
    line = one_error_line(["eval", "--checkpoint", path])
    assert line == (f"kse eval: error: dataset 'fake' has 10 classes but the model in {path} predicts 5; "
                    "use the dataset it was trained on ('fake')")


@pytest.mark.parametrize("argv, match", [
    (["eval", "--repeats", "0"], "kse eval: error: --repeats must be >= 1, got 0"),
    (["eval", "--max-batches", "0"], "kse eval: error: --max-batches must be >= 1, got 0"),
    (["bench", "--batch-size", "1", "0"], "kse bench: error: --batch-size must be >= 1, got 0"),
    (["demo", "--finetune-steps", "-1"], "kse demo: error: --finetune-steps must be >= 0, got -1"),
    (["eval", "--dataset", "cifar11"], "kse eval: error: unknown dataset 'cifar11'; choose one of: "),
])
def test_bad_flag_values(argv, match, finetuned, one_error_line):
    assert one_error_line([*argv, "--checkpoint", finetuned]).startswith(match)


def test_report_formatting():
    from kse.report import fmt_bytes, fmt_count, fmt_ratio, text_table

    assert (fmt_count(851504), fmt_count(125_485_706), fmt_count(12)) == ("851.50K", "125.49M", "12")
    assert (fmt_bytes(3 * 2 ** 20), fmt_bytes(512)) == ("3.00 MiB", "512 B")
    assert (fmt_ratio(10, 4), fmt_ratio(1, 0)) == ("2.50x", "-")
    assert text_table(["name", "n"], [["a", 1], ["long", 100]]).splitlines() == [
        "name    n", "----  ---", "a       1", "long  100"]


def test_yaml_config_sets_compress_defaults(baseline, tmp_path, ok):
    config = tmp_path / "recipe.yaml"
    config.write_text("G: 5\nexclude: ['layer3.*']\n")
    out, _ = ok(["compress", "--config", config, "--checkpoint", baseline, "--out", tmp_path / "c5.kse"])
    model = kse.load(tmp_path / "c5.kse")
    assert model.kse_config["G"] == 5 and model.kse_config["exclude"] == ["layer3.*"]
    names = [n for n, m in model.named_modules() if isinstance(m, kse.KSEConv2d)]
    assert len(names) == 12 and not any(n.startswith("layer3") for n in names)
    assert json.loads((tmp_path / "c5.args.json").read_text())["config"] == str(config)


def test_errors_as_a_process_have_no_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "kse.cli", "eval", "--checkpoint", str(tmp_path / "x.kse")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"kse eval: error: --checkpoint: file not found: {tmp_path / 'x.kse'}"


# ----------------------------------------------------------------------------- prune-l1
def test_prune_l1_matches_a_kse_model_and_finetunes(work, baseline, compressed, ok):
    out_file = work / "l1.kse"
    out, _ = ok(["prune-l1", "--checkpoint", baseline, "--out", out_file, "--match", compressed[0]])
    assert "L1 filter pruning (uniform), ratio" in out and out_file.is_file()
    import kse

    target = kse.profile(kse.load(compressed[0]), (3, 16, 16)).macs
    pruned = kse.load(out_file)
    assert abs(kse.profile(pruned, (3, 16, 16)).macs - target) < 0.05 * target
    assert pruned.layer1[0].conv1.out_channels < 16 and pruned.kse_extra["l1_prune"]["layers"] == ["*.conv1"]
    ok(["finetune", "--checkpoint", out_file, "--out", work / "l1ft", "--epochs", 1, "--max-steps", 1,
        "--batch-size", 8, "--fake-size", 32, *TINY])
    assert (work / "l1ft" / "model.kse").is_file()


@pytest.mark.parametrize("command", ["prune-l1", "prune"])
def test_pruning_to_a_missing_match_file_is_one_line(work, baseline, command, one_error_line):
    line = one_error_line([command, "--checkpoint", baseline, "--out", work / "x.kse", "--match", work / "nosuch.kse"])
    assert line == f"kse {command}: error: --match: file not found: {work / 'nosuch.kse'}"
    assert not (work / "x.kse").exists()


def test_prune_l1_errors(work, baseline, compressed, one_error_line):
    assert "give exactly one of --ratio" in one_error_line(["prune-l1", "--checkpoint", baseline, "--out",
                                                            work / "x.kse"])
    assert "is KSE-compressed" in one_error_line(["prune-l1", "--checkpoint", compressed[0], "--out", work / "x.kse",
                                                  "--ratio", 0.5])
    assert "tied to other layers" in one_error_line(["prune-l1", "--checkpoint", baseline, "--out", work / "x.kse",
                                                     "--ratio", 0.5, "--layers", "layer1.0.conv2"])
    text = work / "notes.txt"
    text.write_text("not a model")
    line = one_error_line(["prune-l1", "--checkpoint", baseline, "--out", work / "x.kse", "--match", text])
    assert line.startswith("kse prune-l1: error: --match: ") and "not a KSE checkpoint" in line
    assert not (work / "x.kse").exists()


# ----------------------------------------------------------------------------- --out, resume, the unexpected
def test_out_that_cannot_be_written_fails_before_any_work(baseline, tmp_path, monkeypatch, one_error_line):
    compress_mod = importlib.import_module("kse.compress")  # the module (kse.compress is the function)

    monkeypatch.setattr(compress_mod, "plan", lambda *a, **k: pytest.fail("compression started"))
    afile = tmp_path / "notes.txt"
    afile.write_text("keep")
    line = one_error_line(["compress", "--checkpoint", baseline, "--out", afile / "a.kse"])
    assert line == f"kse compress: error: --out {afile / 'a.kse'}: {afile} is a file, not a folder"
    line = one_error_line(["compress", "--checkpoint", baseline, "--out", tmp_path])
    assert "is a folder; give the .kse file to write" in line
    for command in (["export", "--checkpoint", baseline], ["analyze", "--checkpoint", baseline]):
        line = one_error_line([*command, "--out", afile])
        assert line.endswith(f"--out {afile} is a file; give a folder to write into")
    line = one_error_line(["train", "--dataset", "fake", "--arch", "resnet20", "--out", afile / "sub" / "run"])
    assert line.endswith(f"{afile} is a file, not a folder")
    assert afile.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_from_a_bad_last_checkpoint_is_one_error(compressed, finetuned, tmp_path, run, ok):
    argv = ["finetune", "--checkpoint", compressed[0], "--epochs", 2, "--max-steps", 1, "--batch-size", 8,
            "--fake-size", 32, "--resume", *TINY]
    def last_error_line(args):  # progress lines come first
        code, _, err = run(args)
        assert code == 2 and "Traceback" not in err, err
        return err.strip().splitlines()[-1]

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "last.ckpt").write_bytes((finetuned / "last.ckpt").read_bytes()[:1000])
    line = last_error_line([*argv, "--out", corrupt])
    assert "last.ckpt is not a readable training checkpoint" in line and "run without --resume" in line
    other = tmp_path / "other"  # a run of another model in the same folder
    ok(["train", "--dataset", "fake", "--arch", "resnet20", "--input-size", 16, "--fake-size", 32, "--epochs", 1,
        "--max-steps", 1, "--batch-size", 8, "--no-channels-last", "--out", other, *TINY])
    line = last_error_line([*argv, "--out", other])
    assert "last.ckpt holds the state of another model" in line and "use another --out" in line
    fresh = tmp_path / "fresh"
    code, _, err = run([*argv, "--out", fresh, "--epochs", 1])
    assert code == 0 and f"resume: no {fresh / 'last.ckpt'} yet; starting at epoch 0" in err


def test_an_unexpected_error_is_one_line_and_the_traceback_is_on_request(baseline, tmp_path, monkeypatch, run):
    compress_mod = importlib.import_module("kse.compress")  # the module (kse.compress is the function)

    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(compress_mod, "plan", bug)
    argv = ["compress", "--checkpoint", baseline, "--out", tmp_path / "c.kse"]
    code, out, err = run(argv)
    assert code == 1 and "Traceback" not in err
    assert err.strip() == ("kse compress: error: ZeroDivisionError: division by zero second line (unexpected; "
                           "KSE_DEBUG=1 shows the traceback)")
    monkeypatch.setenv("KSE_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        run(argv)
    assert not list(tmp_path.iterdir())


def test_finetune_official_sgd(compressed, tmp_path, monkeypatch, ok):
    from kse import train

    built = []
    real = train.build_optimizer
    monkeypatch.setattr(train, "build_optimizer", lambda model, cfg: built.append(cfg) or real(model, cfg))
    for flag, official in (([], False), (["--official-sgd"], True)):
        ok(["finetune", "--checkpoint", compressed[0], "--out", tmp_path / str(official), "--epochs", 1,
            "--max-steps", 1, "--batch-size", 8, "--fake-size", 16, *flag, *TINY])
        assert (built[-1].nesterov, built[-1].decay_norm_and_bias) == (not official, official)
        assert json.loads((tmp_path / str(official) / "args.json").read_text())["official_sgd"] is official
