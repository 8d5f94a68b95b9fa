"""Latency of exported models: a dense baseline against its compressed version, as ONNX
(onnxruntime, CPU) and TorchScript, at batch 1 and 64, in interleaved rounds of one run.
The compressed model is exported in the form ``kse export`` uses by default (``--form full``;
``auto`` measures per layer in PyTorch); outputs are checked against PyTorch (1e-4 relative) first.

    python benchmarks/export_speed.py --dense checkpoints/resnet56-fmnist.kse \\
        --compressed checkpoints/resnet56-fmnist-g4.kse [--threads 2]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import kse
from kse.deploy import deploy_


def _export(model: torch.nn.Module, size: tuple, folder: Path, name: str):
    import onnxruntime as ort

    example = torch.randn(1, *size)
    onnx_path = folder / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(onnx_path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        traced = torch.jit.freeze(torch.jit.trace(model, example))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    check = torch.randn(3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(check)
        ts_out = traced(check)
    onnx_out = torch.from_numpy(session.run(None, {"input": check.numpy()})[0])
    scale = ref.abs().max()
    for label, got in (("onnx", onnx_out), ("torchscript", ts_out)):
        diff = float((got - ref).abs().max() / scale)
        if diff > 1e-4:
            raise SystemExit(f"{name} {label} export differs from PyTorch by {diff:.3g} (relative)")
    return session, traced


def _time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", required=True)
    ap.add_argument("--compressed", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--form", default="full", choices=["full", "dense", "auto"],
                    help="KSE layer form to export (default full, as kse export does)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"dense": kse.load(args.dense).eval(), "compressed": kse.load(args.compressed).eval()}
    size = tuple(models["dense"].kse_preprocess["input_size"])
    forms = deploy_(models["compressed"], form=args.form, input_size=size, batch_size=(1, 8))
    result = {"benchmark": "export_speed", "dense": args.dense, "compressed": args.compressed,
              "forms": {f: list(forms.values()).count(f) for f in sorted(set(forms.values()))}}
    with tempfile.TemporaryDirectory() as tmp:
        exported = {name: _export(m, size, Path(tmp), name) for name, m in models.items()}
        for b in (1, 64):
            x = torch.randn(b, *size, generator=torch.Generator().manual_seed(0))
            feed = {"input": x.numpy()}
            samples = {(name, kind): [] for name in models for kind in ("pytorch", "onnx", "torchscript")}
            for _ in range(args.rounds):
                for (name, kind) in samples:
                    session, traced = exported[name]
                    fn = {"pytorch": lambda: models[name](x), "torchscript": lambda: traced(x),
                          "onnx": lambda: session.run(None, feed)}[kind]
                    with torch.no_grad():
                        samples[(name, kind)].append(_time(fn, args.repeats))
            for kind in ("pytorch", "onnx", "torchscript"):
                dense_ms = 1e3 * statistics.median(samples[("dense", kind)])
                comp_ms = 1e3 * statistics.median(samples[("compressed", kind)])
                result[f"b{b}_{kind}_dense_ms"] = round(dense_ms, 3)
                result[f"b{b}_{kind}_compressed_ms"] = round(comp_ms, 3)
                result[f"b{b}_{kind}_speedup"] = round(dense_ms / comp_ms, 3)
    result.update(torch_threads=torch.get_num_threads(), machine=platform.machine(), torch=torch.__version__)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
