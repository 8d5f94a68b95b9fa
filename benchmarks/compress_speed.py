"""Time KSE compression of torchvision ResNet-50 (all convs but the stem, G=5, T=1), and the
same work done the official way (per-channel sklearn NearestNeighbors + KMeans(n_init=10))
on a subset of layers, so that the speed ratio is measured in one run.

    python benchmarks/compress_speed.py [--layers 4] [--threads N]

Prints one JSON object. Random weights (no download); the cost does not depend on training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import numpy as np
import torch
import torchvision

import kse
from kse.kmeans import cluster_kernels


def official_layer(weight: torch.Tensor, counts: torch.Tensor, k: int = 5) -> None:
    """The authors' per-channel route: sklearn kNN for the entropy, KMeans(n_init=10) per channel."""
    from sklearn.cluster import KMeans
    from sklearn.neighbors import NearestNeighbors

    N, C = weight.shape[:2]
    w = weight.detach().cpu().numpy().reshape(N, C, -1).transpose(1, 0, 2)  # (C, N, D), the paper's layout
    for c in range(C):
        nn_ = NearestNeighbors(n_neighbors=min(k, N - 1) + 1).fit(w[c])
        nn_.kneighbors(w[c])
    for c in range(C):
        q = int(counts[c])
        if 0 < q < N:
            KMeans(n_clusters=q, n_init=10).fit(w[c])


def ours_layer(weight: torch.Tensor, cfg: kse.KSEConfig) -> torch.Tensor:
    v = kse.kse_indicator(weight, cfg.alpha, cfg.k)
    q = kse.centroid_counts(v, weight.shape[0], cfg.G, cfg.T)
    cluster_kernels(weight, q, torch.Generator().manual_seed(cfg.seed), cfg.kmeans_iters, cfg.n_init)
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="layers compared against the official route")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the official route always runs on the CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    cfg = kse.KSEConfig(G=5, T=1, input_size=(3, 224, 224))

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    kse.compress_(model, cfg)
    sync()
    whole = time.perf_counter() - t0
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    # the subset: evenly spaced layers of the original network
    ref = torchvision.models.resnet50().eval().to(args.device)
    names = [p.name for p in kse.plan(ref, cfg)]
    subset = [names[i] for i in np.linspace(0, len(names) - 1, args.layers).round().astype(int)]
    ours_t = official_t = 0.0
    for name in subset:
        w = ref.get_submodule(name).weight
        t = time.perf_counter()
        q = ours_layer(w, cfg)
        sync()
        ours_t += time.perf_counter() - t
        t = time.perf_counter()
        official_layer(w, q, cfg.k)
        official_t += time.perf_counter() - t
    print(json.dumps({
        "benchmark": "compress_speed",
        "model": "torchvision resnet50, all convs but the stem, G=5, T=1",
        "whole_model_s": round(whole, 2),
        "peak_rss_gb": round(peak_rss_gb, 2),
        "rss_before_gb": round(rss0 / 2**20, 2),
        "subset_layers": subset,
        "subset_ours_s": round(ours_t, 3),
        "subset_official_s": round(official_t, 3),
        "speedup_vs_official": round(official_t / max(ours_t, 1e-9), 1),
        "device": args.device,
        "peak_gpu_memory_gb": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                               if args.device.startswith("cuda") else None),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
                   + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "torch": torch.__version__,
    }, indent=1))


if __name__ == "__main__":
    main()
