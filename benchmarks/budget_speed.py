"""What a budget target adds to compression: torchvision ResNet-50 (random weights, every
conv but the stem), ``kse.compress_`` with a fixed G/T against the same with a target.

For each target, the time spent in the budget search itself: the whole of ``fit_to_target_``
less the work a fixed-G compression does too (tracing the graph for dead channels, one
clustering and channel removal, the swap); extra candidates built count as search time.

    python benchmarks/budget_speed.py [--threads N] [--targets 2.5x 1.43G]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import time

import torch
import torchvision

import kse
from kse import budget, dead_channels

compress = importlib.import_module("kse.compress")  # the module (kse.compress is the function)


def timed(owner, name, log):
    """Wrap ``owner.name`` so that each call's wall time is appended to ``log[name]``."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            log.setdefault(name, []).append(time.perf_counter() - t)

    setattr(owner, name, wrapper)
    return fn


def run(cfg: kse.KSEConfig) -> dict:
    log: dict = {}
    originals = [(owner, name, timed(owner, name, log)) for owner, name in (
        (budget, "fit_to_target_"), (dead_channels.ChannelGraph, "build"), (compress, "build_replacements"),
        (compress, "swap_in"), (compress, "plan"), (compress, "find_dead_channels"))]
    try:
        model = torchvision.models.resnet50().eval()
        t = time.perf_counter()
        kse.compress_(model, cfg)
        total = time.perf_counter() - t
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    out = {"total_s": round(total, 2), "plan_s": round(sum(log.get("plan", [])), 2)}
    if "fit_to_target_" in log:
        builds = log.get("build_replacements", [])
        shared = sum(log.get("build", [])) + (builds[0] if builds else 0) + sum(log.get("swap_in", []))
        out.update(fit_s=round(log["fit_to_target_"][0], 2), graph_s=round(sum(log.get("build", [])), 2),
                   candidates_built=len(builds), builds_s=[round(b, 2) for b in builds],
                   search_s=round(log["fit_to_target_"][0] - shared, 2), line=model.kse_budget["line"])
    else:
        out.update(removal_s=round(sum(log.get("find_dead_channels", [])), 2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--targets", nargs="+", default=["2.5x", "1.43G"],
                    help="MAC targets (1.43G: about what G=5 T=1 gives, met by a global setting)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = (3, 224, 224)
    results = {"fixed G=5 T=1": run(kse.KSEConfig(G=5, T=1, input_size=size))}
    for target in args.targets:
        torch.manual_seed(0)
        results[f"target_macs={target}"] = run(kse.KSEConfig(target_macs=target, input_size=size))
    print(json.dumps({
        "benchmark": "budget_speed",
        "model": "torchvision resnet50 (random weights), every conv but the stem",
        "results": results,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "torch": torch.__version__,
    }, indent=1))


if __name__ == "__main__":
    main()
