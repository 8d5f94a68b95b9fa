"""``kse eval`` (accuracy, size, MACs, CPU latency of a checkpoint) and ``kse bench``
(per-layer and whole-model CPU latency of the KSE forms against plain convolutions)."""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List

import torch

from .common import (CLIError, add_command, add_common, at_least, busy_note, checkpoint_input_size, checkpoint_path,
                     deploy_cpu, evaluation_loader, form_counts, kse_layers, load_model, parse_device, set_threads,
                     stage)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..profile import profile
    from ..report import fmt_bytes, fmt_count, measure_latency
    from ..train import evaluate

    path = checkpoint_path(args)
    set_threads(args.threads)
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--max-batches", args.max_batches, 1),
                             ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0)):
        at_least(flag, value, low)
    device = parse_device(args.device)
    model = load_model(path)
    input_size = checkpoint_input_size(model, path)
    loader, info = evaluation_loader(model, args, path, args.batch_size)
    busy_note("eval")
    stage("eval", f"deploying and timing on CPU ({torch.get_num_threads()} threads)")
    forms = deploy_cpu(model, input_size)
    prof = profile(model, input_size)
    latency = measure_latency(model, input_size, 1, args.warmup, args.repeats)
    stage("eval", f"evaluating on the {info.name} test split ({device})")
    metrics = evaluate(model.to(device), loader, device, max_batches=args.max_batches)
    result = {
        "checkpoint": str(path), "arch": model.kse_arch.get("name"), "dataset": info.name,
        "top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"], "count": metrics["count"],
        "params": prof.params, "macs": prof.macs, "fusion_adds": prof.fusion_adds, "stored_bytes": prof.stored_bytes,
        "file_bytes": path.stat().st_size, "latency_ms": latency["median_ms"], "latency_min_ms": latency["min_ms"],
        "latency_batch_size": 1, "latency_repeats": latency["repeats"], "threads": torch.get_num_threads(),
        "kse_layers": len(forms), "forms": form_counts(forms),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    forms_text = ", ".join(f"{n} {f}" for f, n in sorted(result["forms"].items())) or "none"
    print(f"checkpoint  {path} ({result['arch']}, {len(forms)} KSE layers: {forms_text})")
    print(f"dataset     {info.name} test split, {metrics['count']} images")
    print(f"top-1       {metrics['top1']:.2f}%   top-5 {metrics['top5']:.2f}%   loss {metrics['loss']:.4f}")
    print(f"params      {fmt_count(prof.params)}   MACs {fmt_count(prof.macs)} (+{fmt_count(prof.fusion_adds)} "
          f"fusion adds)")
    print(f"file size   {fmt_bytes(result['file_bytes'])}   (stored tensors {fmt_bytes(prof.stored_bytes)})")
    print(f"latency     {latency['median_ms']:.3f} ms/image (CPU, batch 1, {result['threads']} threads, median of "
          f"{latency['repeats']} runs)")
    return 0



def _bench(model: torch.nn.Module, input_size: tuple, batch_sizes: List[int], warmup: int,
           repeats: int, use_fused: bool = False) -> List[Dict[str, Any]]:
    from .. import fused
    from ..forms import INFERENCE_FORMS
    from ..deploy import deploy_
    from ..report import capture_layer_inputs, dense_equivalent, measure_latency, time_call

    if use_fused and not fused.available():
        raise CLIError(f"--fused: the fused kernel could not be built ({fused.build_error()})")
    layers = kse_layers(model)
    baseline = dense_equivalent(model).eval()
    assert not kse_layers(baseline), "dense_equivalent left a KSE layer"
    results = []
    for b in batch_sizes:
        stage("bench", f"batch {b}: timing {len(layers)} KSE layers")
        x = torch.randn(b, *input_size, generator=torch.Generator().manual_seed(b))
        for m in layers.values():
            m.set_form("dense")
        inputs = capture_layer_inputs(model, list(layers), x)
        rows = []
        for name, m in layers.items():
            conv = m.to_conv().eval()
            t_conv = time_call(conv, inputs[name], warmup, repeats)["median_ms"]
            m.set_form("dense")
            t_dense = time_call(m, inputs[name], warmup, repeats)["median_ms"]
            m.set_form("split")
            t_split = time_call(m, inputs[name], warmup, repeats)["median_ms"]
            times = {"dense": t_dense, "split": t_split}
            if use_fused and fused.supports(m):
                m.set_form("fused")
                times["fused"] = time_call(m, inputs[name], warmup, repeats)["median_ms"]
            rows.append({"name": name, "in_channels": m.in_channels, "out_channels": m.out_channels,
                         "kept": len(m.kept_channels), "centroids": len(m.centroids), "conv_ms": t_conv,
                         "dense_ms": t_dense, "split_ms": t_split, "fused_ms": times.get("fused"),
                         "dense_speedup": t_conv / t_dense, "split_speedup": t_conv / t_split,
                         "best": min(times, key=times.get)})
        stage("bench", f"batch {b}: timing the whole model")
        forms = deploy_(model, form="auto", input_size=input_size, batch_size=b,
                        candidates=INFERENCE_FORMS + (("fused",) if use_fused else ()))
        dense_t = measure_latency(baseline, input_size, b, warmup, repeats)
        kse_t = measure_latency(model, input_size, b, warmup, repeats)
        results.append({"batch_size": b, "layers": rows, "model": {
            "dense_ms": dense_t["median_ms"], "kse_ms": kse_t["median_ms"],
            "speedup": dense_t["median_ms"] / kse_t["median_ms"], "forms": form_counts(forms)}})
    return results


def cmd_bench(args: argparse.Namespace) -> int:
    from ..report import text_table

    path = checkpoint_path(args)
    set_threads(args.threads)
    for b in args.batch_size:
        at_least("--batch-size", b, 1)
    at_least("--repeats", args.repeats, 1)
    at_least("--warmup", args.warmup, 0)
    model = load_model(path)
    if not kse_layers(model):
        raise CLIError(f"{path} has no KSE layers; compress it first with `kse compress`")
    input_size = checkpoint_input_size(model, path)
    busy_note("bench")
    results = _bench(model, input_size, list(dict.fromkeys(args.batch_size)), args.warmup, args.repeats,
                     args.fused)
    report = {"checkpoint": str(path), "arch": model.kse_arch.get("name"), "input_size": list(input_size),
              "threads": torch.get_num_threads(), "repeats": args.repeats, "results": results}
    if args.json:
        print(json.dumps(report))
        return 0
    for res in results:
        print(f"batch {res['batch_size']} (CPU, {report['threads']} threads, median of {args.repeats} runs, ms):")
        fused_col = ["fused"] if args.fused else []
        print(text_table(["layer", "C_in", "N", "kept", "centroids", "conv", "dense", "split", *fused_col,
                          "conv/dense", "conv/split", "best"],
                         [[r["name"], r["in_channels"], r["out_channels"], r["kept"], r["centroids"],
                           f"{r['conv_ms']:.3f}", f"{r['dense_ms']:.3f}", f"{r['split_ms']:.3f}",
                           *([f"{r['fused_ms']:.3f}" if r["fused_ms"] is not None else "-"] if args.fused else []),
                           f"{r['dense_speedup']:.2f}x", f"{r['split_speedup']:.2f}x", r["best"]]
                          for r in res["layers"]]))
        mod = res["model"]
        print(f"whole model: dense baseline {mod['dense_ms']:.3f} ms, KSE deployed {mod['kse_ms']:.3f} ms "
              f"({mod['speedup']:.2f}x; forms {mod['forms']})\n")
    return 0


def register(subparsers) -> None:
    p = add_command(
        subparsers, "eval", cmd_eval,
        defaults=dict(batch_size=256, json=False, repeats=50, warmup=5, fake_size=256),
        help="accuracy, size, MACs and CPU latency of a checkpoint",
        description="Top-1 / top-5 on the test split of the checkpoint's dataset, params, MACs, file "
                    "size and CPU latency (ms per image at batch 1, median after warm-up; KSE layers "
                    "deployed first with kse.deploy_(form='auto')).")
    add_common(p, "checkpoint", "dataset", "data-dir", "batch-size", "device")
    p.add_argument("--json", action="store_true", default=None, help="print one JSON object")
    p.add_argument("--max-batches", type=int, default=None, help="evaluate only this many test batches")
    p.add_argument("--repeats", type=int, default=None, help="timed runs for the latency (default 50)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--fake-size", type=int, default=None, help="FakeData size (the test split is a quarter)")

    p = add_command(
        subparsers, "bench", cmd_bench,
        defaults=dict(batch_size=[1, 64], json=False, repeats=20, warmup=3, fused=False),
        help="CPU latency of each KSE layer (dense / split / plain conv) and the model",
        description="Time every KSE layer in its dense and split forms against the same layer as an "
                    "equivalent nn.Conv2d (layer.to_conv()), and the whole model deployed against "
                    "its dense equivalent (every KSE layer replaced by to_conv()). CPU, median of "
                    "repeated runs after warm-up.")
    add_common(p, "checkpoint")
    p.add_argument("--batch-size", type=int, nargs="+", default=None, help="batch sizes to time (default: 1 64)")
    p.add_argument("--json", action="store_true", default=None, help="print one JSON object")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--fused", action="store_true", default=None,
                   help="also time the compiled fused kernel (kse.fused; built on first use, needs a C++ compiler)")
