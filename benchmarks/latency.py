"""Wall-clock latency of KSE-compressed models against their dense originals (CPU).

For each model and setting, at each batch size, prints (one JSON object):
* ``dense_ms``: the original dense model (NCHW); ``dense_channels_last_ms`` the same in
  channels_last, and ``kse_channels_last_ms`` the compressed model deployed and run in
  channels_last; ``latency_ratio_best_layouts`` = the faster dense layout / the faster KSE one
  (the goals below are checked against it);
* ``pruned_ms``: the *pruned structure*, a dense network with only the kept input channels
  (every KSE layer as a dense conv over its kept channels, dead producer channels removed);
* ``kse_ms``: the compressed model after ``kse.deploy_(form="auto")`` at the batch sizes below
  (forms per batch size); each the best of 10 interleaved rounds (``kse.timing.time_interleaved``;
  ``cpu_steal_s``: CPU time the hypervisor gave other guests meanwhile);
* with ``--fold``, all three with BatchNorm folded into their convolutions (``kse.fold_batchnorm``);
* ``mac_ratio_pruned`` (dense MACs / pruned-structure MACs) and ``mac_ratio_paper`` (dense /
  KSE MACs in the paper's accounting), and ``latency_ratio`` = dense_ms / kse_ms;
* ``goal_no_slower`` (the faster KSE layout no slower than the faster dense one) and
  ``goal_pruned_ratio`` (latency_ratio_best_layouts >= 0.9 * mac_ratio_pruned), the targets of
  the speed work;
* per layer and batch size (``layers``): the best time of the layer's dense original conv and of
  each KSE form, the speed-up of the best form, and the fraction of the paper's MAC reduction
  it realises in wall-clock time, ``(speedup - 1) / (paper MAC ratio - 1)`` (1.0: all of it).

    python benchmarks/latency.py [--models resnet56 resnet50] [--checkpoint F] [--repeats 20] [--G 4 5]

Random weights are used unless ``--checkpoint`` names a trained ``.kse`` file (the channel
scores, and so the compression, depend on training).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform

import torch
import torch.nn as nn
import torchvision

import kse
from kse.conv import KSEConv2d
from kse.models import get_model
from kse import fused
from kse.report import capture_layer_inputs
from kse.timing import time_call, time_interleaved

SETTINGS = {
    "resnet56": [dict(G=4), dict(G=5)],
    "resnet50": [dict(G=5, T=1)],
}
INPUT = {"resnet56": (3, 32, 32), "resnet50": (3, 224, 224)}
BATCHES = {"resnet56": (1, 64), "resnet50": (1, 16)}


def pruned_macs(model: nn.Module, input_size) -> int:
    """MACs of the pruned structure: KSE layers counted as dense convs over their kept channels."""
    prof = kse.profile(model, input_size)
    total = prof.macs
    for row in prof.rows:
        if row.kind == "KSEConv2d":
            layer = model.get_submodule(row.name)
            total += row.dense_macs * len(layer.kept_channels) // layer.in_channels - row.macs
    return total


def cpu_steal_s() -> float:
    """CPU time the hypervisor gave to other guests so far (``/proc/stat``), in seconds."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def bench_model(name: str, model: nn.Module, input_size, settings, batches, repeats: int,
                forms=("dense", "full", "split"), device: str = "cpu", layer_table: bool = True,
                fold: bool = False) -> list:
    results = []
    model = model.to(device)
    dense_macs = kse.profile(model, input_size).macs
    for setting in settings:
        small = kse.compress(model, kse.KSEConfig(**setting, input_size=tuple(input_size)))
        small.eval()
        pruned = copy.deepcopy(small)
        kse.deploy_(pruned, form="dense")
        paper = kse.profile(small, input_size).macs
        # the dense and the compressed model in channels_last as well: oneDNN runs small-channel
        # convolutions much faster in that layout, so the fair baseline is the faster dense layout
        small_cl = copy.deepcopy(small).to(memory_format=torch.channels_last)
        chosen_cl = kse.deploy_(small_cl, form="auto", input_size=input_size, candidates=forms, batch_size=batches)
        chosen = kse.deploy_(small, form="auto", input_size=input_size, candidates=forms, batch_size=batches)
        row = {"forms": {f: list(chosen.values()).count(f) for f in sorted(set(chosen.values()))},
               "forms_channels_last": {f: list(chosen_cl.values()).count(f) for f in sorted(set(chosen_cl.values()))},
               "model": name, "setting": setting, "mac_ratio_pruned": dense_macs / pruned_macs(pruned, input_size),
               "mac_ratio_paper": dense_macs / paper, "batchnorm_folded": fold, "batches": {}}
        # --fold: all three with BatchNorm folded into their convolutions (kse.fold_batchnorm)
        dense_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        timed = tuple(kse.fold_batchnorm(m) if fold else m for m in (model, pruned, small, dense_cl, small_cl))
        for b in batches:
            x = torch.randn(b, *input_size, device=device)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            fns = (*timed[:3], lambda _: timed[3](x_cl), lambda _: timed[4](x_cl))
            steal = cpu_steal_s()
            with torch.no_grad():
                t_dense, t_pruned, t_kse, t_dense_cl, t_kse_cl = (t["median_ms"] for t in time_interleaved(
                    fns, x, rounds=10, repeats=max(repeats // 10, 1)))
            steal = cpu_steal_s() - steal
            ratio = t_dense / t_kse
            best = min(t_dense, t_dense_cl) / min(t_kse, t_kse_cl)
            row["batches"][b] = {"dense_ms": round(t_dense, 3), "pruned_ms": round(t_pruned, 3),
                                 "kse_ms": round(t_kse, 3), "latency_ratio": round(ratio, 3),
                                 "dense_channels_last_ms": round(t_dense_cl, 3),
                                 "kse_channels_last_ms": round(t_kse_cl, 3),
                                 "latency_ratio_best_layouts": round(best, 3),
                                 "cpu_steal_s": round(steal, 2),
                                 "goal_no_slower": min(t_kse, t_kse_cl) <= min(t_dense, t_dense_cl),
                                 "goal_pruned_ratio": best >= 0.9 * row["mac_ratio_pruned"]}
        results.append((row, small))
    # the per-layer tables come after every whole-model timing (the headline figures)
    for (row, small), b in itertools.product(results if layer_table else (), batches):
        # per layer, at each batch size: dense original conv vs each KSE form
        names = [n for n, m in small.named_modules() if isinstance(m, KSEConv2d)]
        inputs = capture_layer_inputs(small, names, torch.randn(b, *input_size, device=device))
        layers = row.setdefault("layers", {}).setdefault(b, [])
        for n in names:
            layer = small.get_submodule(n)
            x = inputs[n]
            conv = layer.to_conv()
            prof = kse.profile(nn.Sequential(copy.deepcopy(layer).set_form("train")), tuple(x.shape[1:]))
            paper_ratio = prof.rows[0].dense_macs / max(prof.rows[0].macs, 1)
            times = {}
            keep = layer.form
            with torch.no_grad():
                times["conv"] = time_call(conv, x, 1, repeats)["min_ms"]
                for form in forms:
                    if form == "fused" and not fused.supports(layer):
                        continue
                    layer.set_form(form)
                    times[form] = time_call(layer, x, 1, repeats)["min_ms"]
            layer.set_form(keep)
            best_form = min((f for f in times if f != "conv"), key=times.get)
            speedup = times["conv"] / times[best_form]
            layers.append({"layer": n, **{f"{f}_ms": round(t, 4) for f, t in times.items()}, "best": best_form,
                           "speedup": round(speedup, 3),
                           "paper_mac_ratio": round(paper_ratio, 3),
                           "realised_fraction": round((speedup - 1) / max(paper_ratio - 1, 1e-9), 3)})
    return [row for row, _ in results]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet56"], choices=sorted(SETTINGS))
    ap.add_argument("--checkpoint", default=None, help="a trained .kse (dense) to use instead of random weights")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fused", action="store_true", help="also measure the compiled fused kernel (kse.fused)")
    ap.add_argument("--forms", nargs="+", default=["dense", "full", "split"], choices=["dense", "full", "split"],
                    help="stock forms deploy_ measures (split is slow to time on large layers)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--no-layers", action="store_true", help="whole models only (skip the per-layer table)")
    ap.add_argument("--G", type=int, nargs="+", default=None,
                    help="only the settings with these G (default: every setting of the model)")
    ap.add_argument("--fold", action="store_true",
                    help="time the whole models with BatchNorm folded into their convolutions (kse.fold_batchnorm)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {"benchmark": "latency", "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
           "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
           "results": []}
    for name in args.models:
        if args.checkpoint:
            model = kse.load(args.checkpoint)
            size = tuple(model.kse_preprocess["input_size"])
        else:
            model = (torchvision.models.resnet50() if name == "resnet50" else get_model(name)).eval()
            size = INPUT[name]
        forms = tuple(args.forms) + (("fused",) if args.fused else ())
        settings = [s for s in SETTINGS[name] if args.G is None or s["G"] in args.G]
        if not settings:
            ap.error(f"--G {args.G}: {name} has the settings {SETTINGS[name]}")
        out["results"] += bench_model(name, model, size, settings, BATCHES[name], args.repeats, forms,
                                   args.device, not args.no_layers, args.fold)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
