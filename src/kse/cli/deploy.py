"""``kse deploy`` (choose each KSE layer's fastest CPU form by measuring, and save it) and
``kse export`` (pt2, ONNX and TorchScript files verified against PyTorch, through ``kse.export``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict

import torch

from .common import (CLIError, add_command, add_common, at_least, busy_note, checkpoint_input_size, checkpoint_path,
                     deploy_cpu, form_counts, kse_layers, load_model, output_file, save_args, set_threads, stage,
                     write_model)


def cmd_deploy(args: argparse.Namespace) -> int:
    from .. import fused
    from ..forms import INFERENCE_FORMS
    from ..deploy import deploy_
    from ..report import text_table

    path = checkpoint_path(args)
    out = output_file(args, path, "the deployed .kse file to write")
    set_threads(args.threads)
    for b in args.batch_size:
        at_least("--batch-size", b, 1)
    at_least("--repeats", args.repeats, 1)
    if args.fused and not fused.available():
        raise CLIError(f"--fused: the fused kernel could not be built ({fused.build_error()}); drop --fused")
    model = load_model(path)
    layers = kse_layers(model)
    if not layers:
        raise CLIError(f"{path} has no KSE layers; compress it first with `kse compress`")
    input_size = checkpoint_input_size(model, path)
    sizes = sorted(set(args.batch_size))
    busy_note("deploy")
    stage("deploy", f"timing every form of {len(layers)} KSE layers at batch {', '.join(map(str, sizes))} "
                    f"(CPU, {torch.get_num_threads()} threads)")
    forms = deploy_(model, form="auto", input_size=input_size, batch_size=sizes, repeats=args.repeats,
                    candidates=INFERENCE_FORMS + (("fused",) if args.fused else ()))
    write_model(args, model, out, getattr(model, "kse_extra", None))
    print(text_table(["layer", "form"], [[n, f] for n, f in forms.items()]))
    print(f"forms: {', '.join(f'{f} x{c}' for f, c in form_counts(forms).items())}")
    print(f"wrote {out} (loading it keeps these forms; nothing is measured again)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import FORMATS, ExportError, export_model

    path = checkpoint_path(args)
    if not args.out:
        raise CLIError("--out is required: the folder to write model.pt2 / model.onnx / model.ts.pt into")
    formats = list(dict.fromkeys(args.format))
    if "onnx" in formats:
        try:
            import onnxruntime  # noqa: F401 - checked before any work
            import onnxscript  # noqa: F401
        except ImportError as exc:
            others = " ".join(f for f in FORMATS if f != "onnx")
            raise CLIError(f"ONNX export needs onnxscript and is verified with onnxruntime ({exc.name} is not "
                           f"installed); pip install 'kse[export]' or pass --format {others}") from None
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    model = load_model(path)
    input_size = checkpoint_input_size(model, path)
    forms: Dict[str, str] = {}
    if kse_layers(model):
        from ..deploy import deploy_

        forms = deploy_(model, form=args.form, input_size=input_size) if args.form != "auto" else \
            deploy_cpu(model, input_size, (args.batch_size,), fused=True, command="export")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_args(args, out)

    def written(fmt: str, entry: dict) -> None:
        print(f"wrote {entry['file']} (verified: max relative difference {entry['max_rel_diff']:.2e} on a batch of "
              f"{entry['check_batch']})")

    try:
        manifest = export_model(model, out, formats, input_size=input_size, batch_size=args.batch_size, forms=forms,
                                form=args.form, fold=args.fold, header={"checkpoint": str(path)},
                                on_note=lambda msg: stage("export", msg), on_written=written)
    except ExportError as exc:
        raise CLIError(str(exc)) from None
    for fmt in FORMATS:
        if f"{fmt}_needs" in manifest:
            print(f"note: {FORMATS[fmt]} calls the fused KSE kernel (torch.ops.kse.fused_conv); it needs "
                  f"{manifest[f'{fmt}_needs']}")
    print(f"wrote {out / 'export.json'}")
    return 0


def register(subparsers) -> None:
    p = add_command(
        subparsers, "deploy", cmd_deploy,
        defaults=dict(batch_size=[1, 64], repeats=5, fused=False),
        help="choose each KSE layer's fastest CPU form by measuring, and save it",
        description="Time every KSE layer in each inference form (dense over the kept channels, "
                    "full, split, and with --fused the compiled kernel) at each --batch-size, give "
                    "each layer the fastest form at each size (a form per batch size, such as "
                    "fused@1,full@64, where they differ) and write a .kse file that keeps them.")
    add_common(p, "checkpoint", "out")
    p.add_argument("--batch-size", type=int, nargs="+", default=None,
                   help="batch sizes to measure at (default: 1 64); inputs run in the form of the nearest one")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per form and size (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--fused", action="store_true", default=None,
                   help="also consider the compiled fused kernel (kse.fused; built on first use, needs a C++ compiler)")

    p = add_command(
        subparsers, "export", cmd_export, folder_out=True,
        defaults=dict(format=["pt2", "onnx"], form="auto", batch_size=1,
                      fold=True),
        help="export a checkpoint to a pt2 package, ONNX or TorchScript (verified)",
        description="Deploy the KSE layers and export the model: pt2 (torch.export, then compiled by "
                    "AOTInductor into a package that keeps the fused KSE kernel; reloaded with "
                    "torch._inductor.aoti_load_package and checked), ONNX (the torch.export-based exporter, "
                    "checked with onnxruntime on CPU) and TorchScript (torch.jit.trace, reloaded and checked). "
                    "Outputs must match PyTorch within 1e-4 relative. Writes OUT/model.pt2, OUT/model.onnx, "
                    "OUT/model.ts.pt (the formats asked for) and OUT/export.json. The batch axis is dynamic.")
    add_common(p, "checkpoint", "out")
    p.add_argument("--format", nargs="+", choices=["pt2", "onnx", "torchscript"], default=None,
                   help="formats to write (default: pt2 onnx)")
    p.add_argument("--form", choices=["auto", "dense", "full", "split", "fused"], default=None,
                   help="KSE layer form to export (default auto: for pt2 and TorchScript the fastest per layer at "
                        "--batch-size on this CPU, the compiled fused kernel among them when it builds; for "
                        "ONNX full, zero kernels for dropped channels: onnxruntime cannot run the kernel, and "
                        "runs the gather of 'dense' slowly). An explicit form applies to all formats, except that "
                        "ONNX gets full where it says fused")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size the forms are chosen for and the TorchScript trace runs at (default 1); "
                        "the exported batch axis stays dynamic")
    p.add_argument("--no-fold", dest="fold", action="store_false", default=None,
                   help="keep BatchNorm layers (default: fold each into the convolution before it, and a ReLU "
                        "after it into a KSE layer, with kse.fold_batchnorm)")
