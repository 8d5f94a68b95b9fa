"""``kse demo``: the whole pipeline on a trained checkpoint (baseline -> KSE -> fine-tune ->
deploy), with a before/after report of accuracy, size, MACs and CPU latency."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .common import (CLIError, add_command, add_common, at_least, busy_note, check_dataset_fits, checkpoint_input_size,
                     checkpoint_path, dataset_name, deploy_cpu, fake_input_size, form_counts, kse_config, kse_layers,
                     load_model, loaders, parse_device, save_args, save_json, set_threads, stage, training_extension)
from .compress import add_recalibrate_flags, compress_model, recalibrate, recalibration_loader

DEMO_HOWTO = ("make it with `kse train --arch resnet56 --dataset fashion-mnist --out checkpoints/resnet56-fmnist` "
              "and copy checkpoints/resnet56-fmnist/model.kse to checkpoints/resnet56-fmnist.kse, or pass --checkpoint")


def checkpoint_candidates() -> List[Path]:
    """Where ``kse demo`` looks for its baseline: the repository's checkpoints/, then the current folder's."""
    import kse

    found: List[Path] = []
    for base in (Path(kse.__file__).resolve().parents[2], Path.cwd()):
        for rel in ("checkpoints/resnet56-fmnist.kse", "checkpoints/resnet56-fmnist/model.kse"):
            if base / rel not in found:
                found.append(base / rel)
    return found


class _Stages:
    """Numbered progress lines on stderr, with the time each stage took."""

    def __init__(self, total: int) -> None:
        import time

        self.total, self.index, self.clock = total, 0, time.perf_counter
        self.start = self.t0 = self.clock()
        self.seconds: Dict[str, float] = {}
        self.current: Optional[str] = None

    def __call__(self, key: str, msg: str) -> None:
        self.close()
        self.index += 1
        self.current, self.t0 = key, self.clock()
        stage("demo", f"[{self.index}/{self.total}] {msg}")

    def close(self) -> None:
        if self.current is not None:
            self.seconds[self.current] = round(self.clock() - self.t0, 2)
            self.current = None


def _demo_finetune(model, train_loader, args, device) -> Dict[str, Any]:
    from ..train import finetune_steps

    if len(train_loader) == 0:
        raise CLIError("the training split is smaller than one batch; lower --batch-size")
    training_extension("demo", model, device)
    return finetune_steps(model, train_loader, args.finetune_steps, args.lr, device, seed=args.seed)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..report import accuracy_rows, fmt_bytes, fmt_count, fmt_ratio, layer_summary, markdown_table, \
        plot_layers, summary_totals, text_table
    from ..serialization import save
    from ..timing import time_interleaved
    from ..train import evaluate

    if args.checkpoint:
        path = checkpoint_path(args)
    else:
        candidates = checkpoint_candidates()
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise CLIError(f"no baseline checkpoint at {candidates[0]}; {DEMO_HOWTO}")
    for flag, value, low in (("--finetune-steps", args.finetune_steps, 0), ("--repeats", args.repeats, 1),
                             ("--batch-size", args.batch_size, 1), ("--eval-batches", args.eval_batches, 1)):
        at_least(flag, value, low)
    if not args.lr > 0:
        raise CLIError(f"--lr must be a positive number, got {args.lr}")
    kse_config(args)
    set_threads(args.threads)
    device = parse_device(args.device)
    at_least("--recalibrate", args.recalibrate, 0)
    out = Path(args.out)
    stages = _Stages(8 if args.recalibrate else 7)

    baseline = load_model(path)  # a bad file fails before any progress line
    input_size = checkpoint_input_size(baseline, path)
    name = dataset_name(baseline, args, path)
    busy_note("demo")  # before any work of ours: the load average would count the demo itself
    stages("load", f"loaded the baseline {path} ({baseline.kse_arch.get('name')}); loading {name}")
    train_loader, test_loader, info = loaders(name, args.data_dir, args.batch_size, 0, args.fake_size,
                                               fake_input_size(baseline), args.seed)
    check_dataset_fits(baseline, info, path)
    calibration = recalibration_loader(baseline, args, path, standalone=False)
    out.mkdir(parents=True, exist_ok=True)
    save_args(args, out)

    stages("eval_baseline", f"evaluating the baseline on the {name} test split ({device})")
    acc_base = evaluate(baseline.to(device), test_loader, device, max_batches=args.eval_batches)
    baseline.cpu()
    stage("demo", f"      baseline top-1 {acc_base['top1']:.2f}% on {acc_base['count']} images")

    stages("compress", f"compressing with KSE G={args.G} T={args.T} alpha={args.alpha}")
    model = copy.deepcopy(baseline)
    plans, prof_base, prof_kse = compress_model(model, args, path)
    stage("demo", f"      {len(plans)} layers; params {fmt_count(prof_base.params)} -> {fmt_count(prof_kse.params)}, "
                  f"MACs {fmt_count(prof_base.macs)} -> {fmt_count(prof_kse.macs)}")

    stages("eval_compressed", "evaluating the compressed model right after compression")
    acc_compressed = evaluate(model.to(device), test_loader, device, max_batches=args.eval_batches)
    model.cpu()
    stage("demo", f"      top-1 {acc_compressed['top1']:.2f}% right after compression")

    acc_recalibrated, recalibrated = None, None
    if calibration is not None:
        stages("recalibrate", f"recalibrating the BatchNorm statistics on {args.recalibrate} training batches of "
                              f"{args.batch_size} (no labels, no gradients) and evaluating")
        model.to(device)
        recalibrated = recalibrate(model, calibration, args, "demo", say=False)
        acc_recalibrated = evaluate(model, test_loader, device, max_batches=args.eval_batches)
        model.cpu()
        stage("demo", f"      top-1 {acc_recalibrated['top1']:.2f}% after recalibration")

    stages("finetune", f"fine-tuning the centroids for {args.finetune_steps} steps (batch {args.batch_size}, "
                       f"lr {args.lr}, {device})")
    finetune = _demo_finetune(model, train_loader, args, device) if args.finetune_steps else {"steps": 0}

    stages("deploy", "deploying the KSE layers (fastest form per layer and batch size on this CPU) and evaluating")
    model.cpu().eval()
    forms = deploy_cpu(model, input_size, (1, 64), fused=args.fused)
    acc_kse = evaluate(model.to(device), test_loader, device, max_batches=args.eval_batches)
    model.cpu()
    stage("demo", f"      top-1 {acc_kse['top1']:.2f}% after fine-tuning ({form_counts(forms)})")
    model_file = out / "model.kse"
    save(model, model_file, extra={**(getattr(baseline, "kse_extra", None) or {}), "compressed_from": str(path),
                                   "demo_finetune": finetune})

    stages("latency", f"timing on CPU, batch 1 and 64 ({torch.get_num_threads()} threads, best of 10 "
                      f"interleaved rounds of {max(args.repeats // 10, 1)} runs)")
    latency, forms_by_batch = {}, {}
    layers = kse_layers(model)
    timed = {"baseline": baseline.eval(), "kse": model.eval()}
    try:  # both also as deployed for inference: BatchNorm folded into the convolutions
        from ..fold import fold_batchnorm

        timed.update(baseline_folded=fold_batchnorm(baseline), kse_folded=fold_batchnorm(model))
        # and the folded baseline in channels_last, the layout where oneDNN runs it fastest: the
        # fair baseline
        cl = fold_batchnorm(copy.deepcopy(baseline).to(memory_format=torch.channels_last))
        timed["baseline_folded_cl"] = lambda x, m=cl: m(x.contiguous(memory_format=torch.channels_last))
    except ValueError as exc:
        stage("demo", f"      note: BatchNorm not folded ({exc})")
    for b in (1, 64):
        forms_by_batch[b] = form_counts({n: m.form_for_batch(b) for n, m in layers.items()})
        x = torch.randn(b, *input_size, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            times = time_interleaved(list(timed.values()), x, rounds=10, repeats=max(args.repeats // 10, 1))
        latency[b] = dict(zip(timed, times))
    stages.close()

    rows = layer_summary(plans)
    plot = plot_layers(rows, out / "layers.png", G=args.G,
                       title=f"{baseline.kse_arch.get('name')} on {name}: KSE G={args.G} T={args.T}")
    sizes = (path.stat().st_size, model_file.stat().st_size)
    table = accuracy_rows(acc_base["top1"], [
        ("right after compression", acc_compressed["top1"]),
        (f"BatchNorm recalibrated ({args.recalibrate} batches)", acc_recalibrated and acc_recalibrated["top1"]),
        (f"fine-tuned ({finetune['steps']} steps)", acc_kse["top1"])]) + [
        ["top-5 (%)", f"{acc_base['top5']:.2f}", f"{acc_kse['top5']:.2f}", f"{acc_kse['top5'] - acc_base['top5']:+.2f} pt"],
        ["params", fmt_count(prof_base.params), fmt_count(prof_kse.params), fmt_ratio(prof_base.params, prof_kse.params)],
        ["MACs", fmt_count(prof_base.macs), fmt_count(prof_kse.macs), fmt_ratio(prof_base.macs, prof_kse.macs)],
        ["file size", fmt_bytes(sizes[0]), fmt_bytes(sizes[1]), fmt_ratio(*sizes)],
    ]
    for suffix, label, kse_key in (("", "", "kse"), ("_folded", ", BatchNorm folded", "kse_folded"),
                                   ("_folded_cl", ", folded, baseline channels_last", "kse_folded")):
        for b in (1, 64) if "baseline" + suffix in timed else ():
            base_ms, kse_ms = latency[b]["baseline" + suffix]["median_ms"], latency[b][kse_key]["median_ms"]
            table.append([f"CPU latency, batch {b}{label} (ms)", f"{base_ms:.2f}", f"{kse_ms:.2f}",
                          fmt_ratio(base_ms, kse_ms)])
    headers = ["", "baseline", f"KSE G={args.G}", "ratio / change"]
    report = {
        "checkpoint": str(path), "arch": baseline.kse_arch.get("name"), "dataset": name,
        "kse_config": model.kse_config, "test_images": acc_base["count"],
        "baseline": {"top1": acc_base["top1"], "top5": acc_base["top5"], "params": prof_base.params,
                     "macs": prof_base.macs, "file_bytes": sizes[0],
                     "latency_ms": {str(b): latency[b]["baseline"]["median_ms"] for b in latency},
                     "latency_folded_ms": {str(b): latency[b]["baseline_folded"]["median_ms"]
                                           for b in latency if "baseline_folded" in latency[b]},
                     "latency_folded_channels_last_ms": {str(b): latency[b]["baseline_folded_cl"]["median_ms"]
                                                         for b in latency if "baseline_folded_cl" in latency[b]}},
        "compressed": {"top1": acc_kse["top1"], "top5": acc_kse["top5"],
                       "top1_after_compression": acc_compressed["top1"], "top5_after_compression": acc_compressed["top5"],
                       "top1_after_recalibration": acc_recalibrated and acc_recalibrated["top1"],
                       "top5_after_recalibration": acc_recalibrated and acc_recalibrated["top5"],
                       "recalibration": recalibrated, "params": prof_kse.params,
                       "macs": prof_kse.macs, "fusion_adds": prof_kse.fusion_adds, "file_bytes": sizes[1],
                       "latency_ms": {str(b): latency[b]["kse"]["median_ms"] for b in latency},
                       "latency_folded_ms": {str(b): latency[b]["kse_folded"]["median_ms"]
                                             for b in latency if "kse_folded" in latency[b]},
                       "forms": form_counts(forms), "forms_by_batch": {str(b): f for b, f in forms_by_batch.items()}},
        "finetune": finetune, "threads": torch.get_num_threads(), "latency_repeats": args.repeats,
        "layers": [{k: v for k, v in r.items() if k != "indicator"} for r in rows], "totals": summary_totals(rows),
        "stage_seconds": stages.seconds, "files": {"model": str(model_file), "plot": str(plot)},
    }
    save_json(out / "report.json", report)
    from ..atomic import write_text

    total_s = sum(stages.seconds.values())
    write_text(out / "report.md", "\n".join([
        f"# KSE demo: {report['arch']} on {name}", "",
        f"Baseline `{path}`, compressed with KSE G={args.G}, T={args.T}, alpha={args.alpha}, "
        + (f"its BatchNorm statistics recalibrated on {args.recalibrate} training batches of {args.batch_size} images "
           f"(no labels, no gradients; docs/recalibration.md), " if recalibrated else "")
        + f"fine-tuned for {finetune['steps']} steps (lr {args.lr}). Accuracy on {acc_base['count']} test images; latency on CPU "
        f"({report['threads']} threads, best of 10 interleaved rounds of {max(args.repeats // 10, 1)} runs; KSE layer "
        f"forms chosen by measurement for each batch size: " + ", ".join(f"batch {b}: {f}" for b, f in forms_by_batch.items()) + ").", "",
        markdown_table(headers, table), "",
        f"MACs follow the paper's deployment accounting (docs/method.md §7): the centroid convolutions; the "
        f"channel-fusion additions ({fmt_count(prof_kse.fusion_adds)}) are not included. Latency is measured on the forms "
        f"that ran fastest here (`fused`: this package's compiled kernel), so it need not shrink as much as the "
        f"MACs. \"BatchNorm folded\": both models as deployed for inference (`kse.fold_batchnorm`, what "
        f"`kse export` does), each BatchNorm folded into the convolution before it.", "",
        f"{report['totals']['layers']} layers compressed: input channels kept {report['totals']['kept']}/"
        f"{report['totals']['in_channels']}, {report['totals']['centroids']} centroids for "
        f"{report['totals']['kernels']} kernels ({report['totals']['ratio']:.2f}x).", "",
        "![per-layer channels kept and centroids, indicator histogram](layers.png)", "",
        "Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.seconds.items()) + f"; total {total_s:.0f}.",
        ""]))
    print(text_table(headers, table))
    print()
    for f in (model_file, out / "report.json", out / "report.md", plot):
        print(f"wrote {f}")
    stage("demo", f"done in {total_s:.0f}s")
    return 0


def register(subparsers) -> None:
    p = add_command(
        subparsers, "demo", cmd_demo, folder_out=True,
        defaults=dict(out="runs/demo", G=4, T=0, alpha=1.0, lr=0.01, batch_size=128, seed=0, finetune_steps=300,
                      repeats=40, fake_size=256, fused=True, recalibrate=100),
        help="baseline -> KSE -> fine-tune -> deploy, with a before/after report",
        description="End-to-end KSE on a trained checkpoint (default: checkpoints/resnet56-fmnist.kse): "
                    "evaluate it on its dataset's test split, compress with KSE G=4, evaluate, "
                    "recalibrate the BatchNorm statistics on 100 training batches and evaluate, "
                    "fine-tune briefly, deploy, and report top-1, params, MACs, file size and CPU "
                    "latency (batch 1 and 64) before and after. Writes report.json, report.md, "
                    "model.kse and layers.png to --out. No network needed.")
    add_common(p, "checkpoint", "dataset", "data-dir", "out", "G", "T", "alpha", "lr", "batch-size", "device", "seed")
    add_recalibrate_flags(p, "default 100", batch_size=False)
    p.add_argument("--finetune-steps", type=int, default=None, help="fine-tuning steps (default 300; 0 skips)")
    p.add_argument("--eval-batches", type=int, default=None, help="evaluate only this many test batches of 256")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per latency, spread over 10 interleaved rounds (default 40)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--fake-size", type=int, default=None, help="FakeData train size (for a fake checkpoint)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="consider the compiled fused kernel when deploying (default: on; built once, needs a C++ "
                        "compiler; without one the stock forms are used)")
