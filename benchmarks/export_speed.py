"""Latency of exported models: a dense baseline against its compressed version, as ``kse export``
writes them, at batch 1 and 64, in interleaved rounds of one run (best round's median,
kse.timing.time_interleaved).

Formats (``--formats``, default all three): ``pt2`` (torch.export, then AOTInductor's compiled
package, run with ``torch._inductor.aoti_load_package``), ``onnx`` (the torch.export-based
exporter, run by onnxruntime on CPU) and ``torchscript`` (torch.jit.trace, the saved file
reloaded). The compressed model is exported as ``kse export`` does by default (``--form auto``):
for pt2 and TorchScript the forms measured fastest at that batch size, the compiled fused kernel
among them (one export per batch size: a file keeps the forms of the batch size it was made
for); for ONNX zero kernels for the dropped channels (``full``). The dense model is exported
once (its batch axis is dynamic). Both models with BatchNorm folded into their convolutions
(``--no-fold``: kept). Every file is checked against PyTorch (1e-4 relative) by
``kse.export`` first; "pytorch" times the unfolded eager models. AOTInductor compiles each pt2
file with the machine's C++ compiler (minutes for a ResNet-56).

    python benchmarks/export_speed.py --dense checkpoints/resnet56-fmnist.kse \\
        --compressed checkpoints/resnet56-fmnist-g4.kse [--threads 2] [--formats pt2] [--out FILE]

Prints one JSON object (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path
from typing import Callable, Dict, List

import torch

import kse
from kse import fused
from kse.atomic import write_text
from kse.deploy import deploy_
from kse.export import FORMATS, export_model
from kse.forms import INFERENCE_FORMS
from kse.timing import time_interleaved


def _runners(folder: Path, formats: List[str]) -> Dict[str, Callable[[torch.Tensor], object]]:
    """The files ``kse.export`` wrote into ``folder``, loaded as callables on a batch."""
    runners = {}
    for fmt in formats:
        path = str(folder / FORMATS[fmt])
        if fmt == "pt2":
            runners[fmt] = torch._inductor.aoti_load_package(path)
        elif fmt == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            runners[fmt] = lambda t, s=session: s.run(None, {"input": t.numpy()})
        else:
            runners[fmt] = torch.jit.load(path)
    return runners


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", required=True)
    ap.add_argument("--compressed", required=True)
    ap.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--form", default="auto", choices=["auto", "full", "dense", "fused"],
                    help="KSE layer form to export, as kse export --form (default auto: measured at each batch "
                         "size with the fused kernel among the candidates for pt2 and TorchScript, full for ONNX)")
    ap.add_argument("--no-fold", dest="fold", action="store_false",
                    help="export with the BatchNorm layers kept (kse export --no-fold)")
    ap.add_argument("--out", default=None, help="also write the JSON object to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    formats = list(dict.fromkeys(args.formats))
    models = {"dense": kse.load(args.dense).eval(), "compressed": kse.load(args.compressed).eval()}
    size = tuple(models["dense"].kse_preprocess["input_size"])
    result = {"benchmark": "export_speed", "dense": args.dense, "compressed": args.compressed, "form": args.form,
              "formats": formats, "batchnorm_folded": args.fold, "fused_kernel": fused.available()}
    candidates = INFERENCE_FORMS + (("fused",) if fused.available() else ())
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = Path(tmp) / "dense"
        export_model(models["dense"], dense_dir, formats, input_size=size, fold=args.fold)
        dense = _runners(dense_dir, formats)
        for b in args.batch_size:
            if args.form == "auto":
                forms = deploy_(models["compressed"], form="auto", input_size=size, batch_size=b,
                                candidates=candidates)
            else:
                forms = deploy_(models["compressed"], form=args.form, input_size=size)
            folder = Path(tmp) / f"compressed_b{b}"
            manifest = export_model(models["compressed"], folder, formats, input_size=size, batch_size=b,
                                    forms=forms, form=args.form, fold=args.fold)
            for fmt in formats:
                result[f"b{b}_forms_{fmt}"] = manifest["exports"][fmt]["forms"]
                result[f"b{b}_{fmt}_max_rel_diff"] = manifest["exports"][fmt]["max_rel_diff"]
            compressed = _runners(folder, formats)
            x = torch.randn(b, *size, generator=torch.Generator().manual_seed(0))
            kinds = ["pytorch"] + formats
            fns, keys = [], []
            for name, runners in (("dense", dense), ("compressed", compressed)):
                fns += [models[name]] + [runners[fmt] for fmt in formats]
                keys += [(name, kind) for kind in kinds]
            with torch.no_grad():
                times = dict(zip(keys, time_interleaved(fns, x, rounds=args.rounds, repeats=args.repeats)))
            for kind in kinds:
                dense_ms, comp_ms = times[("dense", kind)]["median_ms"], times[("compressed", kind)]["median_ms"]
                result[f"b{b}_{kind}_dense_ms"] = round(dense_ms, 3)
                result[f"b{b}_{kind}_compressed_ms"] = round(comp_ms, 3)
                result[f"b{b}_{kind}_speedup"] = round(dense_ms / comp_ms, 3)
    result.update(torch_threads=torch.get_num_threads(), machine=platform.machine(), torch=torch.__version__)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
