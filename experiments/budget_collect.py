"""Tabulate the equal-budget experiment written by experiments/budget_resnet56.sh.

For every budget and method: the MACs (paper accounting for KSE layers), params, stored size
and file size of the fine-tuned model; test top-1 of the cut model before fine-tuning
(evaluated here, full 10k test set) and after (the last epoch of its fine-tuning); CPU latency
at batch 1 and 64, each KSE model in its stock deploy forms (dense / full / split, measured
per layer by ``kse.deploy_``) and with the compiled kernel among them (``fused``); the pruned
models are plain dense networks (one figure for both). All latencies are taken in one
interleaved run per batch size (``kse.timing.time_interleaved``: the best round's median), so
that machine noise hits every model alike. Prints JSON, and writes the JSON, a Markdown table
and the accuracy-vs-MACs plot.

    python experiments/budget_collect.py --base checkpoints/resnet56-fmnist.kse \\
        --base-metrics checkpoints/resnet56-fmnist/stage2-metrics.jsonl --out runs/budget \\
        --budgets 1.6x 2x 2.5x 3x --run short --threads 1 --results experiments/results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import kse
from kse.atomic import write_text
from kse.budget import latency_forms
from kse.forms import INFERENCE_FORMS
from kse.data import get_dataset
from kse.deploy import deploy_
from kse.report import markdown_table
from kse.timing import time_interleaved
from kse.train import evaluate

METHODS = [("kse-global", "KSE, one global G/T (paper)"), ("kse-layer", "KSE, per-layer allocation"),
           ("l1", "L1 filter pruning, uniform"), ("tp-global", "Torch-Pruning global group-magnitude")]


def read_epochs(path: Path) -> list[dict]:
    """The per-epoch metrics of a run (its metrics.jsonl), at least one epoch."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"{path} holds no epoch")
    return lines


def last_top1(path: Path) -> float:
    return read_epochs(path)[-1]["test_top1"]


def test_top1(model: torch.nn.Module, loader) -> float:
    return evaluate(model, loader, torch.device("cpu"))["top1"]


def describe(path: Path) -> dict:
    model = kse.load(path)
    size = tuple(model.kse_preprocess["input_size"])
    prof = kse.profile(model, size)
    return {"file": str(path), "params": prof.params, "macs": prof.macs, "stored_bytes": prof.stored_bytes,
            "file_bytes": path.stat().st_size}


def deployed(path: Path, fused: bool, channels_last: bool = False) -> torch.nn.Module:
    """The model of ``path`` with its KSE layers in the forms measured fastest at batch 1 and 64
    (the compiled kernel among the candidates when ``fused``), in the given memory layout."""
    model = kse.load(path).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if any(isinstance(m, kse.KSEConv2d) for m in model.modules()):
        size = tuple(model.kse_preprocess["input_size"])
        forms = latency_forms() if fused else INFERENCE_FORMS
        deploy_(model, form="auto", input_size=size, batch_size=(1, 64), candidates=forms)
    return model


def interleaved_latency(models: dict, size: tuple, rounds: int, batch_sizes=(1, 64)) -> dict:
    """name -> {"b1_ms": ..., "b64_ms": ...}: every model timed in one interleaved run per batch
    size (``kse.timing.time_interleaved``, the best round's median)."""
    names = list(models)
    latency = {n: {} for n in names}
    for batch in batch_sizes:
        x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))
        timed = time_interleaved([models[n] for n in names], x, rounds=rounds, repeats=4)
        for n, t in zip(names, timed):
            latency[n][f"b{batch}_ms"] = t["median_ms"]
    return latency


def parse_args(doc: str, argv, add=None) -> argparse.Namespace:
    """The collectors' common flags (and those ``add(parser)`` adds); sets the thread count."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--base-metrics", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="the experiment's folder (OUT of the script)")
    ap.add_argument("--results", type=Path, default=None, help="where to write the results (default: --out)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--eval-batches", type=int, default=None, help="cap the test batches (quick checks)")
    if add:
        add(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.results = args.results or args.out
    args.results.mkdir(parents=True, exist_ok=True)
    return args


def test_loader(eval_batches=None) -> torch.utils.data.DataLoader:
    """The Fashion-MNIST test set in batches of 256 (the first ``eval_batches`` only, if given)."""
    test_set, _ = get_dataset("fashion-mnist", train=False)
    if eval_batches:
        test_set = torch.utils.data.Subset(test_set, range(min(len(test_set), 256 * eval_batches)))
    return torch.utils.data.DataLoader(test_set, batch_size=256)


def main(argv=None) -> int:
    def add(ap):
        ap.add_argument("--budgets", nargs="+", required=True)
        ap.add_argument("--run", default="short", help="RUN of the script: the fine-tuning folders' prefix")

    args = parse_args(__doc__, argv, add)
    results, loader = args.results, test_loader(args.eval_batches)

    base = {"label": "baseline", **describe(args.base), "top1": last_top1(args.base_metrics)}
    rows = []
    for b in args.budgets:
        for key, label in METHODS:
            cut, tuned = args.out / f"{key}-{b}.kse", args.out / f"{args.run}-{key}-{b}" / "model.kse"
            if not tuned.is_file():
                continue
            row = {"budget": b, "method": key, "label": label, **describe(tuned),
                   "top1_before": test_top1(kse.load(cut), loader),
                   "top1": last_top1(tuned.parent / "metrics.jsonl")}
            budget = kse.serialization.read_metadata(cut)["extra"].get("budget")
            row["setting"] = budget["setting"] if budget else None
            rows.append(row)
            print(f"{b} {key}: top-1 {row['top1_before']:.2f} -> {row['top1']:.2f}, {row['macs'] / 1e6:.2f}M MACs",
                  file=sys.stderr, flush=True)

    # latency: every model (stock and fused forms) in one interleaved run per batch size
    models = {"baseline": kse.load(args.base).eval()}
    for r in rows:
        path = Path(r["file"])
        models[f"{r['budget']} {r['method']} stock"] = deployed(path, fused=False)
        if r["method"].startswith("kse"):
            models[f"{r['budget']} {r['method']} fused"] = deployed(path, fused=True)
    latency = interleaved_latency(models, tuple(models["baseline"].kse_preprocess["input_size"]), args.rounds)
    base.update({"b1_ms": latency["baseline"]["b1_ms"], "b64_ms": latency["baseline"]["b64_ms"]})
    for r in rows:
        stock = latency[f"{r['budget']} {r['method']} stock"]
        fused = latency.get(f"{r['budget']} {r['method']} fused", stock)
        r.update({"b1_ms": stock["b1_ms"], "b64_ms": stock["b64_ms"],
                  "b1_fused_ms": fused["b1_ms"], "b64_fused_ms": fused["b64_ms"]})

    out = {"threads": torch.get_num_threads(), "run": args.run, "baseline": base, "rows": rows,
           "latency": "best round's median of interleaved rounds (kse.timing.time_interleaved)"}
    write_text(results / f"budget_resnet56_{args.run}.json", json.dumps(out, indent=2) + "\n")

    table = [["baseline", "", f"{base['macs'] / 1e6:.2f}M", f"{base['params'] / 1e3:.1f}K",
              f"{base['file_bytes'] / 2**20:.2f} MiB", "", f"{base['top1']:.2f}", f"{base['b1_ms']:.2f}", "",
              f"{base['b64_ms']:.1f}", ""]]
    for r in rows:
        fused = r["method"].startswith("kse")
        table.append([r["label"], r["budget"], f"{r['macs'] / 1e6:.2f}M ({base['macs'] / r['macs']:.2f}x)",
                      f"{r['params'] / 1e3:.1f}K", f"{r['file_bytes'] / 2**20:.2f} MiB", f"{r['top1_before']:.2f}",
                      f"{r['top1']:.2f}", f"{r['b1_ms']:.2f}", f"{r['b1_fused_ms']:.2f}" if fused else "",
                      f"{r['b64_ms']:.1f}", f"{r['b64_fused_ms']:.1f}" if fused else ""])
    md = markdown_table(["method", "budget", "MACs", "params", "file", "top-1 before FT", "top-1 after FT",
                         "b1 ms", "b1 ms fused", "b64 ms", "b64 ms fused"], table)
    write_text(results / f"budget_resnet56_{args.run}.md", md + "\n")
    plot(rows, base, results / f"budget_accuracy_vs_macs_{args.run}.png", args.run)
    print(json.dumps(out, indent=2))
    print(md)
    return 0


def plot(rows, base, path: Path, run: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (key, label), marker in zip(METHODS, "os^v"):
        mine = sorted((r for r in rows if r["method"] == key), key=lambda r: r["macs"])
        if mine:
            ax.plot([r["macs"] / 1e6 for r in mine], [r["top1"] for r in mine], marker + "-", label=label)
    ax.axhline(base["top1"], color="gray", lw=0.8, ls=":", label=f"baseline ({base['macs'] / 1e6:.1f}M MACs)")
    ax.set_xlabel("MACs (millions)")
    ax.set_ylabel("test top-1 after fine-tuning (%)")
    ax.set_title(f"ResNet-56 on Fashion-MNIST at equal MAC budgets ({run} fine-tuning)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
