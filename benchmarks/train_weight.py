"""Time building W' for a training step, layer by layer: the compiled extension
(``kse.fused.expand_weight``) against the stock operations it replaced, forward alone and
forward + backward (the gradient reduced onto the centroids), in one process, alternating.

    python benchmarks/train_weight.py [--checkpoint checkpoints/resnet56-fmnist-g4.kse] [--threads 1]
        [--nchw] [--rounds 5] [--layers PAT]

Prints one JSON object: per layer and per stage (first part of the layer name) the median time
of each (microseconds, Python call included), and the totals.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import platform
import statistics
import time

import torch

import kse
import kse.training_weight
from kse import fused
from kse.conv import KSEConv2d


def per_call_us(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/resnet56-fmnist-g4.kse", help="a compressed .kse file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nchw", action="store_true", help="W' in NCHW (default: channels_last, as train_step.py)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=200, help="calls per timing")
    ap.add_argument("--layers", default="*", help="glob of the layer names to time (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not fused.available():
        raise SystemExit(f"the compiled extension is unavailable: {fused.build_error()}")
    model = kse.load(args.checkpoint).train()
    cl = not args.nchw
    layers, stages = [], {}
    for name, layer in model.named_modules():
        if not isinstance(layer, KSEConv2d) or not fnmatch.fnmatch(name, args.layers):
            continue
        upstream = torch.randn_like(layer.training_weight(cl))  # over the channels the forward convolves

        def forward(ext: bool):
            kse.training_weight.configure_training(extension=ext)
            return layer.training_weight(cl)

        def both(ext: bool):
            torch.autograd.grad(forward(ext), layer.centroids, upstream)

        fast = forward(True)
        stock = forward(False)
        assert torch.equal(fast, stock) and fast.stride() == stock.stride()
        times = {key: [] for key in ("stock_fwd", "ext_fwd", "stock_fwd_bwd", "ext_fwd_bwd")}
        for r in range(args.rounds):
            for ext in ((True, False) if r % 2 == 0 else (False, True)):
                tag = "ext" if ext else "stock"
                times[f"{tag}_fwd"].append(per_call_us(lambda: forward(ext), args.repeats))
                times[f"{tag}_fwd_bwd"].append(per_call_us(lambda: both(ext), args.repeats))
        kse.training_weight.configure_training(extension=True)
        row = {"layer": name, "weight": list(fast.shape), **{k: round(statistics.median(v), 2) for k, v in times.items()}}
        layers.append(row)
        stage = stages.setdefault(name.split(".")[0], dict.fromkeys(times, 0.0))
        for k in times:
            stage[k] += row[k]
    total = {k: round(sum(r[k] for r in layers), 1) for k in ("stock_fwd", "ext_fwd", "stock_fwd_bwd", "ext_fwd_bwd")}
    total["fwd_bwd_speedup"] = round(total["stock_fwd_bwd"] / total["ext_fwd_bwd"], 3)
    print(json.dumps({"benchmark": "train_weight", "checkpoint": args.checkpoint, "channels_last": cl,
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "machine": platform.machine(), "unit": "us per call", "total": total,
                      "stages": {k: {m: round(v, 1) for m, v in s.items()} for k, s in stages.items()},
                      "layers": layers}, indent=1))


if __name__ == "__main__":
    main()
