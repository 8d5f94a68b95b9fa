"""Time the exact ablation importance of ``kse explain`` (kse.ablation) three ways in one
interleaved run, on the committed ResNet-56 Fashion-MNIST baseline (random images if the data
set is missing; the cost does not depend on the pixels):

* ``hooks``: the obvious method, a forward pre-hook zeroes the channel and the whole model is
  re-run per channel;
* ``fx, 1 worker``: trace, cache what the rest of the network reads, re-run only the nodes
  after the layer on a batch of channel-ablated copies (one layer at a time, one thread);
* ``fx, N workers``: the same, N layers at a time, one intra-op thread each (the default).

    python benchmarks/explain_ablation.py [--images 16] [--layers layer1.0.conv1 layer2.4.conv2 layer3.7.conv1]
                                          [--rounds 2] [--workers 2]

Prints one JSON object: best time of each method over the rounds, the ratios, and the largest
difference between the fast and the reference results. ``--full`` times only the default
method on all 54 layers (the number ``kse explain`` spends on its ablation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import kse
from kse.ablation import DEFAULT_ROWS, ablation_importance, ablation_importance_hooks
from kse.explain import match_layers

ROOT = Path(__file__).resolve().parents[1]


def images(n: int):
    try:
        from kse.data import get_dataset

        ds, _ = get_dataset("fashion-mnist", train=False)
        batch = [ds[i] for i in range(n)]
        return torch.stack([x for x, _ in batch]), torch.tensor([int(y) for _, y in batch]), "fashion-mnist test"
    except ValueError:
        g = torch.Generator().manual_seed(0)
        return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), "random"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "resnet56-fmnist.kse"))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--layers", nargs="+", default=["layer1.0.conv1", "layer2.4.conv2", "layer3.7.conv1"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    ap.add_argument("--full", action="store_true", help="all layers, the default method only")
    args = ap.parse_args()
    model = kse.load(args.checkpoint).eval()
    x, y, source = images(args.images)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    info = {"checkpoint": Path(args.checkpoint).name, "images": args.images, "data": source, "rows": args.rows,
            "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_before": load}
    if args.full:
        names = match_layers(model, None, kse.KSEConfig(), x[:2])
        torch.set_num_threads(args.workers)
        t = time.perf_counter()
        ablation_importance(model, names, x, y, rows=args.rows, workers=args.workers)
        info.update(layers=len(names), channels=sum(model.get_submodule(n).in_channels for n in names),
                    workers=args.workers, seconds=round(time.perf_counter() - t, 2))
        info["load_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        print(json.dumps(info))
        return
    methods = {
        "hooks": lambda: (torch.set_num_threads(1), ablation_importance_hooks(model, args.layers, x, y))[1],
        "fx_1_worker": lambda: (torch.set_num_threads(1),
                                ablation_importance(model, args.layers, x, y, rows=args.rows, workers=1))[1],
        f"fx_{args.workers}_workers": lambda: (torch.set_num_threads(args.workers),
                                               ablation_importance(model, args.layers, x, y, rows=args.rows,
                                                                   workers=args.workers))[1],
    }
    best = {k: float("inf") for k in methods}
    results = {}
    for _ in range(args.rounds):
        for name, run in methods.items():
            t = time.perf_counter()
            results[name] = run()
            best[name] = min(best[name], time.perf_counter() - t)
    ref = results["hooks"]
    diff = max(float((results[m][n].loss_increase - ref[n].loss_increase).abs().max())
               for m in methods if m != "hooks" for n in args.layers)
    info.update(layers=args.layers, rounds=args.rounds, seconds={k: round(v, 3) for k, v in best.items()},
                speedup_vs_hooks={k: round(best["hooks"] / v, 2) for k, v in best.items() if k != "hooks"},
                max_abs_difference_loss_increase=diff,
                load_after=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
