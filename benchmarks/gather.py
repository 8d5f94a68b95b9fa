"""Time the input-channel gather of a KSE layer (``kse.forms.select_channels``) on channels_last
inputs against the ``index_select`` along the NHWC view's channel dim it replaced, forward alone
and forward + backward, interleaved in one process (``kse.timing.time_interleaved``).

    python benchmarks/gather.py [--threads 2] [--rounds 5] [--keep 0.7]

Prints one JSON object: per shape ``[B, C, H, W]`` the best round's median time of each, in
milliseconds, and ``speedup`` = index_select / gather.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from kse.forms import select_channels
from kse.timing import time_interleaved

# DenseNet-40's widest layer inputs at 28x28, 14x14 and 7x7, and a ResNet-56 stage-1 input
SHAPES = [(64, 136, 28, 28), (64, 256, 14, 14), (64, 436, 7, 7), (128, 16, 28, 28), (1, 436, 7, 7)]


def index_select_nhwc(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The replaced path: index_select along the channel dim of the NHWC view."""
    return x.permute(0, 2, 3, 1).index_select(3, kept).permute(0, 3, 1, 2)


def forward_backward(fn, kept, grad):
    def run(x):
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            fn(leaf, kept).backward(grad)
        return leaf.grad
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--keep", type=float, default=0.7, help="share of the input channels kept")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for shape in SHAPES:
        x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
        C = shape[1]
        kept = torch.randperm(C, generator=g)[: max(1, int(args.keep * C))].sort().values
        want = x[:, kept]
        assert torch.equal(select_channels(x, kept), want) and torch.equal(index_select_nhwc(x, kept), want)
        grad = torch.randn(want.shape, generator=g)
        fwd = time_interleaved([lambda t: index_select_nhwc(t, kept), lambda t: select_channels(t, kept)], x,
                               rounds=args.rounds, repeats=10)
        both = time_interleaved([forward_backward(index_select_nhwc, kept, grad),
                                 forward_backward(select_channels, kept, grad)], x, rounds=args.rounds, repeats=5)
        row = {"shape": list(shape), "kept": len(kept)}
        for stage, (old, new) in (("forward", fwd), ("forward_backward", both)):
            row[stage] = {"index_select_ms": round(old["median_ms"], 4), "gather_ms": round(new["median_ms"], 4),
                          "speedup": round(old["median_ms"] / new["median_ms"], 2)}
        rows.append(row)
    print(json.dumps({"benchmark": "gather", "torch": torch.__version__, "machine": platform.machine(),
                      "threads": args.threads, "keep": args.keep, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
