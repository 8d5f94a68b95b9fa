"""Tabulate the DenseNet-40 experiment written by experiments/fmnist_densenet40.sh.

For the baseline and every fine-tuned model: test top-1 (the last epoch of its training or
fine-tuning, full 10k test set), params, MACs (paper accounting for KSE layers), file size;
test top-1 of each cut model before fine-tuning (evaluated here); CPU latency at batch 1 and 64
with KSE layers in their stock deploy forms (dense / full / split, measured per layer by
``kse.deploy_``) and with the compiled kernel among them (``fused``); every model, dense or
deployed, in both memory layouts (NCHW and channels_last, the faster one is reported). All
latencies come from one interleaved run per batch size (``kse.timing.time_interleaved``, the best
round's median), so that machine noise hits every model alike. The paper's CIFAR-10 row is quoted
beside them. Writes JSON and a Markdown table.

    python experiments/densenet_collect.py --base checkpoints/densenet40-fmnist.kse \\
        --base-metrics checkpoints/densenet40-fmnist/long-run/metrics.jsonl --out runs/dn40 \\
        --threads 2 --results experiments/results/densenet40
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import kse
from kse.atomic import write_text
# this folder's tabulation helpers
from budget_collect import (deployed, describe, interleaved_latency, last_top1, parse_args, read_epochs, test_loader,
                            test_top1)
from kse.report import markdown_table

# (label, row key, cut model): each row's fine-tuned model is OUT/ft-KEY/model.kse, with its per-epoch
# metrics beside it; a "-more" row is its run fine-tuned further (MORE in fmnist_densenet40.sh,
# docs/densenet.md), so it shares that run's cut model, and {more} in its label becomes the number
# of epochs in its metrics
TP_LABEL, MORE = "Torch-Pruning global group-magnitude, MACs of KSE G=6", ", {more} more epochs (cosine from lr 0.01)"
RUNS = [("KSE G=6 (paper's setting)", "g6", "g6"), ("KSE G=6" + MORE, "g6-more", "g6"),
        ("KSE G=5", "g5", "g5"), ("KSE G=4", "g4", "g4"),
        (TP_LABEL, "tp-g6", "tp-g6"), (TP_LABEL + MORE, "tp-g6-more", "tp-g6")]
# quoted from the paper (docs/method.md, section 9), CIFAR-10 at 32x32: not measured here
PAPER = {"label": "paper: DenseNet-40 KSE G=6, CIFAR-10", "top1": 94.70, "macs": 115e6, "params": 0.39e6}


# what is timed of each model, in both memory layouts: a dense model as it is; a KSE model deployed
# with the stock forms and with the fused kernel among them ("" and "stock" name no fused kernel)
DENSE, KSE_KINDS = ("",), ("stock", "fused")


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)
    results, loader = args.results, test_loader(args.eval_batches)

    base = {"label": "baseline", **describe(args.base), "top1": last_top1(args.base_metrics)}
    rows, before = [], {}  # before: top-1 of each cut model, evaluated once
    for label, key, start in RUNS:
        cut, tuned = args.out / f"{start}.kse", args.out / f"ft-{key}" / "model.kse"
        if not tuned.is_file():
            print(f"{key}: not fine-tuned yet ({tuned} missing), left out", file=sys.stderr)
            continue
        if start not in before:
            before[start] = test_top1(kse.load(cut), loader)
        history = read_epochs(tuned.parent / "metrics.jsonl")
        row = {"key": key, "label": label.format(more=len(history)), **describe(tuned), "top1_before": before[start],
               "top1": history[-1]["test_top1"], "epochs": len(history)}
        rows.append(row)
        print(f"{key}: top-1 {row['top1_before']:.2f} -> {row['top1']:.2f}, {row['macs'] / 1e6:.2f}M MACs",
              file=sys.stderr, flush=True)

    # latency: every model, kind and layout in one interleaved run per batch size; a KSE model is
    # deployed in the layout it runs in (its forms are measured there)
    paths = {"baseline": args.base, **{r["key"]: Path(r["file"]) for r in rows}}
    kinds = {key: DENSE if key == "baseline" or key.startswith("tp") else KSE_KINDS for key in paths}
    models = {" ".join(filter(None, (key, kind, layout))): deployed(path, fused=kind == "fused",
                                                                    channels_last=layout == "channels_last")
              for key, path in paths.items() for kind in kinds[key] for layout in ("nchw", "channels_last")}
    names = list(models)
    latency = interleaved_latency(models, tuple(models["baseline nchw"].kse_preprocess["input_size"]), args.rounds)

    def fastest(prefix: str, batch: int) -> tuple:
        ms, layout = min((latency[n][f"b{batch}_ms"], n[len(prefix) + 1:]) for n in names if n.startswith(prefix + " "))
        return ms, layout

    for r in [base] + rows:
        key = "baseline" if r is base else r["key"]
        for batch in (1, 64):
            for kind in kinds[key]:
                at = f"b{batch}_fused" if kind == "fused" else f"b{batch}"
                r[f"{at}_ms"], r[f"{at}_layout"] = fastest(" ".join(filter(None, (key, kind))), batch)

    out = {"threads": torch.get_num_threads(), "baseline": base, "rows": rows, "paper": PAPER, "latency_all": latency,
           "latency": "best round's median of interleaved rounds (kse.timing.time_interleaved)"}
    write_text(results / "densenet40_fmnist.json", json.dumps(out, indent=2) + "\n")

    def ms(r: dict, batch: int) -> str:
        def one(key: str) -> str:
            return f"{r[f'b{batch}{key}_ms']:.2f} ({r[f'b{batch}{key}_layout']})"
        return one("") + (f" / {one('_fused')}" if f"b{batch}_fused_ms" in r else "")

    table = [["baseline", "", f"{base['top1']:.2f}", f"{base['params'] / 1e6:.3f}M", f"{base['macs'] / 1e6:.1f}M",
              f"{base['file_bytes'] / 2**20:.2f} MiB", ms(base, 1), ms(base, 64)]]
    for r in rows:
        table.append([r["label"], f"{r['top1_before']:.2f}", f"{r['top1']:.2f}",
                      f"{r['params'] / 1e6:.3f}M ({base['params'] / r['params']:.2f}x)",
                      f"{r['macs'] / 1e6:.1f}M ({base['macs'] / r['macs']:.2f}x)",
                      f"{r['file_bytes'] / 2**20:.2f} MiB", ms(r, 1), ms(r, 64)])
    table.append([PAPER["label"], "", f"{PAPER['top1']:.2f}", f"{PAPER['params'] / 1e6:.2f}M",
                  f"{PAPER['macs'] / 1e6:.0f}M", "", "", ""])
    md = markdown_table(["model", "top-1 before FT", "top-1", "params", "MACs", "file",
                         "b1 ms (stock / fused)", "b64 ms (stock / fused)"], table)
    write_text(results / "densenet40_fmnist.md", md + "\n")
    print(json.dumps(out, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
