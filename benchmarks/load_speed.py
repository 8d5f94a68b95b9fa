"""Inference speed of a compressed file as loaded, without any deploy call, against the dense
file it came from: both read with ``kse.load`` (eval mode), run under ``torch.no_grad``.

    python benchmarks/load_speed.py [--kse checkpoints/resnet56-fmnist-g4.kse]
        [--dense checkpoints/resnet56-fmnist.kse] [--batch-sizes 1 64] [--rounds 10] [--threads N]

Prints one JSON object: per batch size, each model's time (the best of ``rounds`` interleaved
rounds' medians, ``kse.timing.time_interleaved``; the order of the two alternates between
rounds) and ``speed_ratio`` = dense_ms / kse_ms (1.0: as fast; above: faster), the median over
rounds of the same ratio within each round (``speed_ratio_median_of_rounds``: the two measured
back to back, so that load from other processes cancels), with the forms the
compressed model's layers ran in (``kse.forms.default_form``: no measuring) and the largest
difference of its outputs to its training form's (the slow reference).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import platform
import statistics
import sys

import torch

import kse
from kse.conv import KSEConv2d
from kse.timing import time_interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kse", default="checkpoints/resnet56-fmnist-g4.kse", help="a compressed .kse file")
    ap.add_argument("--dense", default="checkpoints/resnet56-fmnist.kse", help="the dense .kse file it came from")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=None, help="calls per round (default: 40 at batch 1, fewer above)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    compressed, dense = kse.load(args.kse), kse.load(args.dense)  # eval mode, as loaded: no deploy_
    size = tuple(compressed.kse_preprocess["input_size"])
    layers = [m for m in compressed.modules() if isinstance(m, KSEConv2d)]
    reference = copy.deepcopy(compressed)
    for m in reference.modules():
        if isinstance(m, KSEConv2d):
            m.train()  # W' rebuilt on every call; BatchNorm stays in eval mode
    result = {"benchmark": "load_speed", "command": " ".join(["python", *sys.argv]), "kse": args.kse,
              "dense": args.dense, "input_size": list(size), "rounds": args.rounds, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "kse_layers": len(layers), "saved_forms": dict(collections.Counter(m.form for m in layers)),
              "batches": {}}
    for b in args.batch_sizes:
        x = torch.randn(b, *size, generator=torch.Generator().manual_seed(b))
        repeats = args.repeats or max(4, 40 // b)
        with torch.no_grad():
            want = reference(x)
            difference = float((compressed(x) - want).abs().max() / want.abs().max())
        order = [dense, compressed]
        times = {"dense": [], "kse": []}
        for r in range(args.rounds):  # one round at a time, the order reversed every other round
            pair = order if r % 2 == 0 else order[::-1]
            got = time_interleaved(pair, x, rounds=1, repeats=repeats, warmup=2)
            for model, t in zip(pair, got):
                times["dense" if model is dense else "kse"].append(t["median_ms"])
        dense_ms, kse_ms = min(times["dense"]), min(times["kse"])
        per_round = sorted(d / k for d, k in zip(times["dense"], times["kse"]))
        result["batches"][str(b)] = {
            "dense_ms": round(dense_ms, 4), "kse_ms": round(kse_ms, 4), "speed_ratio": round(dense_ms / kse_ms, 4),
            "speed_ratio_median_of_rounds": round(statistics.median(per_round), 4),
            "dense_rounds_ms": [round(t, 4) for t in times["dense"]],
            "kse_rounds_ms": [round(t, 4) for t in times["kse"]],
            "kse_forms": dict(collections.Counter(m.form_for_batch(b) for m in layers)),
            "relative_difference_to_training_form": difference, "repeats_per_round": repeats}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
