"""Latency of exported models: a dense baseline against its compressed version, as ONNX
(onnxruntime, CPU) and TorchScript, at batch 1 and 64, in interleaved rounds of one run (best
round's median, kse.timing.time_interleaved). The compressed model is exported as ``kse export``
does by default (``--form auto``): for TorchScript the forms measured fastest at that batch size,
the compiled fused kernel among them (traced once per batch size: a trace keeps the forms of its
batch size); for ONNX zero kernels for the dropped channels (``full``); both models with
BatchNorm folded into their convolutions (``--no-fold``: kept). Outputs are checked against
PyTorch (1e-4 relative) first; "pytorch" times the unfolded eager models.

    python benchmarks/export_speed.py --dense checkpoints/resnet56-fmnist.kse \\
        --compressed checkpoints/resnet56-fmnist-g4.kse [--threads 2]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import warnings
from pathlib import Path

import torch

import kse
from kse import fused
from kse.conv import KSEConv2d
from kse.deploy import deploy_
from kse.forms import INFERENCE_FORMS, without_fused
from kse.timing import time_interleaved


def _export(model: torch.nn.Module, size: tuple, folder: Path, name: str, batch: int, onnx_forms=None):
    """ONNX (onnxruntime session) and frozen TorchScript (traced at ``batch``) of ``model``, both
    checked against PyTorch; ``onnx_forms``: the KSE layer forms to export to ONNX (then put back)."""
    import onnxruntime as ort

    layers = {n: m for n, m in model.named_modules() if isinstance(m, KSEConv2d)}
    ts_forms = {n: m.form for n, m in layers.items()}
    example = torch.randn(batch, *size)
    onnx_path = folder / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n, f in (onnx_forms or {}).items():
            layers[n].set_form(f)
        torch.onnx.export(model, (example,), str(onnx_path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        for n, f in ts_forms.items():
            layers[n].set_form(f)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", required=True)
    ap.add_argument("--compressed", required=True)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--form", default="auto", choices=["auto", "full", "dense", "fused"],
                    help="KSE layer form to export, as kse export --form (default auto: measured at each batch "
                         "size with the fused kernel among the candidates for TorchScript, full for ONNX)")
    ap.add_argument("--no-fold", dest="fold", action="store_false",
                    help="export with the BatchNorm layers kept (kse export --no-fold)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"dense": kse.load(args.dense).eval(), "compressed": kse.load(args.compressed).eval()}
    size = tuple(models["dense"].kse_preprocess["input_size"])
    result = {"benchmark": "export_speed", "dense": args.dense, "compressed": args.compressed, "form": args.form,
              "batchnorm_folded": args.fold,
              "fused_kernel": fused.available()}
    candidates = INFERENCE_FORMS + (("fused",) if fused.available() else ())
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.batch_size:
            # TorchScript keeps the forms of the batch size it is traced at: one export per batch size
            if args.form == "auto":
                forms = deploy_(models["compressed"], form="auto", input_size=size, batch_size=b,
                                candidates=candidates)
                onnx_forms = {n: "full" for n in forms}
            else:
                forms = deploy_(models["compressed"], form=args.form, input_size=size)
                onnx_forms = {n: without_fused(f, "full") for n, f in forms.items()}
            result[f"b{b}_forms_torchscript"] = {f: list(forms.values()).count(f) for f in sorted(set(forms.values()))}
            result[f"b{b}_forms_onnx"] = {f: list(onnx_forms.values()).count(f) for f in sorted(set(onnx_forms.values()))}
            # as kse export does: BatchNorm folded into the convolutions (and a ReLU into KSE layers)
            folded = {name: kse.fold_batchnorm(m) if args.fold else m for name, m in models.items()}
            exported = {name: _export(folded[name], size, Path(tmp), f"{name}_b{b}", b,
                                      onnx_forms if name == "compressed" else None) for name in models}
            x = torch.randn(b, *size, generator=torch.Generator().manual_seed(0))
            kinds = ("pytorch", "onnx", "torchscript")
            fns, keys = [], []
            for name, model in models.items():
                session, traced = exported[name]
                fns += [model, lambda t, s=session: s.run(None, {"input": t.numpy()}), traced]
                keys += [(name, kind) for kind in kinds]
            with torch.no_grad():
                times = dict(zip(keys, time_interleaved(fns, x, rounds=args.rounds, repeats=args.repeats)))
            for kind in kinds:
                dense_ms, comp_ms = times[("dense", kind)]["median_ms"], times[("compressed", kind)]["median_ms"]
                result[f"b{b}_{kind}_dense_ms"] = round(dense_ms, 3)
                result[f"b{b}_{kind}_compressed_ms"] = round(comp_ms, 3)
                result[f"b{b}_{kind}_speedup"] = round(dense_ms / comp_ms, 3)
    result.update(torch_threads=torch.get_num_threads(), machine=platform.machine(), torch=torch.__version__)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
