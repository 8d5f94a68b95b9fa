"""Tabulate the Fashion-MNIST experiment written by experiments/fmnist_resnet56.sh.

For every model: test top-1 (the last epoch of its fine-tuning, full 10k test set), params,
MACs (paper accounting for KSE layers), compressed file size, and CPU latency at batch 1 and
64 (KSE layers in the form measured fastest over batch 1 and 64; all models timed in interleaved rounds so that
machine noise hits them alike); for the main models also the top-1 without fine-tuning, right
after compression and with recalibrated BatchNorm statistics (the script's `kse eval --json`
files). Prints JSON, and writes results.json, results.md and the accuracy-vs-MACs plot into OUT.

    python experiments/collect.py --base checkpoints/resnet56-fmnist.kse --base-metrics \\
        checkpoints/resnet56-fmnist/stage2-metrics.jsonl --out runs/exp

With ``--recalibrated-only`` (after ``RECALIBRATED_ONLY=1 bash experiments/fmnist_resnet56.sh``)
only the models without fine-tuning are tabulated, into OUT/recalibrated.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import kse
from kse.atomic import write_text
from kse.deploy import deploy_
from kse.report import markdown_table, measure_latency

MAIN = [("KSE G=4", "ft-g4"), ("KSE G=5", "ft-g5"), ("L1 filter pruning (MACs of KSE G=4)", "ft-l1-g4")]
SWEEP_KSE = [("G=3", "short-g3"), ("G=4", "short-g4"), ("G=5", "short-g5"), ("G=6", "short-g6")]
SWEEP_L1 = [("L1 @ G=3", "short-l1-g3"), ("L1 @ G=4", "short-l1-g4"), ("L1 @ G=5", "short-l1-g5"),
            ("L1 @ G=6", "short-l1-g6")]
ABLATION = [("KSE (alpha=1)", "short-g4"), ("sparsity alone", "short-g4-sparsity"),
            ("entropy alone", "short-g4-entropy"), ("KSE, official entropy layout", "short-g4-official")]
# no fine-tuning: (label as in MAIN, model right after compression, the same recalibrated)
NO_FINETUNING = [("KSE G=4", "g4", "rc-g4"), ("KSE G=5", "g5", "rc-g5"),
                 ("L1 filter pruning (MACs of KSE G=4)", "l1-g4", "rc-l1-g4")]


def last_metrics(path: Path) -> dict:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"{path} holds no epoch")
    return lines[-1]


def describe(model_path: Path, metrics_path: Path) -> dict:
    model = kse.load(model_path)
    size = tuple(model.kse_preprocess["input_size"])
    prof = kse.profile(model, size)
    m = last_metrics(metrics_path)
    return {"file": str(model_path), "top1": m["test_top1"], "params": prof.params, "macs": prof.macs,
            "file_bytes": model_path.stat().st_size, "input_size": list(size)}


def without_finetuning(out: Path) -> list:
    """Top-1 of the main models right after compression and after BatchNorm recalibration, from
    the ``kse eval --json`` files the script writes; rows whose files are missing are left out."""
    rows = []
    for label, plain, recalibrated in NO_FINETUNING:
        files = [out / f"{name}.eval.json" for name in (plain, recalibrated)]
        if not all(f.is_file() for f in files):
            continue
        before, after = (json.loads(f.read_text()) for f in files)
        model = kse.load(out / f"{recalibrated}.kse")
        rows.append({"label": label, "top1_compressed": before["top1"], "top1_recalibrated": after["top1"],
                     "test_images": after["count"], "params": after["params"], "macs": after["macs"],
                     "recalibration": model.kse_extra.get("recalibrated"),
                     "files": {"compressed": str(out / f"{plain}.kse"), "recalibrated": str(out / f"{recalibrated}.kse")}})
    return rows


def no_finetuning_table(rows: list, base: dict) -> str:
    table = [["baseline", f"{base['macs'] / 1e6:.2f}M", f"{base['top1']:.2f}", ""]] if "top1" in base else []
    table += [[r["label"], f"{r['macs'] / 1e6:.2f}M ({base['macs'] / r['macs']:.2f}x)", f"{r['top1_compressed']:.2f}",
               f"{r['top1_recalibrated']:.2f}"] for r in rows]
    return markdown_table(
        ["model (no fine-tuning)", "MACs", "top-1 right after compression (%)", "top-1 recalibrated (%)"], table)


def latencies(paths: dict, batch_sizes=(1, 64), rounds: int = 5, repeats: int = 10) -> dict:
    """Median over interleaved rounds of each model's median latency, per batch size."""
    models = {}
    for name, path in paths.items():
        model = kse.load(path).eval()
        size = tuple(model.kse_preprocess["input_size"])
        if any(isinstance(m, kse.KSEConv2d) for m in model.modules()):
            deploy_(model, form="auto", input_size=size, batch_size=(1, 64))
        models[name] = (model, size)
    out = {name: {} for name in paths}
    for b in batch_sizes:
        samples = {name: [] for name in paths}
        for _ in range(rounds):
            for name, (model, size) in models.items():
                samples[name].append(measure_latency(model, size, b, warmup=2, repeats=repeats)["median_ms"])
        for name in paths:
            out[name][f"b{b}_ms"] = statistics.median(samples[name])
    return out


def plot(rows_kse, rows_l1, base, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["macs"] / 1e6 for r in rows_kse], [r["top1"] for r in rows_kse], "o-", label="KSE (G=3..6)")
    for r in rows_kse:
        ax.annotate(r["label"], (r["macs"] / 1e6, r["top1"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([r["macs"] / 1e6 for r in rows_l1], [r["top1"] for r in rows_l1], "s--", label="L1 filter pruning")
    ax.axhline(base["top1"], color="gray", lw=0.8, ls=":", label=f"baseline ({base['macs'] / 1e6:.1f}M MACs)")
    ax.set_xlabel("MACs (millions)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("ResNet-56 on Fashion-MNIST, equal short fine-tuning")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--base-metrics", type=Path, default=None,
                    help="the baseline's metrics.jsonl (required unless --recalibrated-only)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--recalibrated-only", action="store_true",
                    help="tabulate only the models without fine-tuning (OUT/recalibrated.json and .md)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out
    if args.recalibrated_only:
        model = kse.load(args.base)
        prof = kse.profile(model, tuple(model.kse_preprocess["input_size"]))
        base = {"file": str(args.base), "params": prof.params, "macs": prof.macs}
        if (out / "baseline.eval.json").is_file():
            base["top1"] = json.loads((out / "baseline.eval.json").read_text())["top1"]
        rows = without_finetuning(out)
        if not rows:
            raise SystemExit(f"no *.eval.json pairs in {out}; run RECALIBRATED_ONLY=1 bash experiments/fmnist_resnet56.sh")
        result = {"baseline": base, "no_finetuning": rows}
        write_text(out / "recalibrated.json", json.dumps(result, indent=2) + "\n")
        write_text(out / "recalibrated.md", no_finetuning_table(rows, base) + "\n")
        json.dump(result, sys.stdout, indent=2)
        print()
        print(no_finetuning_table(rows, base))
        return 0
    if args.base_metrics is None:
        raise SystemExit("--base-metrics is required (or --recalibrated-only)")
    base = describe(args.base, args.base_metrics)

    def run(folder: str) -> dict:
        return describe(out / folder / "model.kse", out / folder / "metrics.jsonl")

    main_rows = [{"label": label, **run(folder)} for label, folder in MAIN if (out / folder / "model.kse").is_file()]
    if not args.no_latency and main_rows:
        lat = latencies({"baseline": args.base, **{r["label"]: Path(r["file"]) for r in main_rows}})
        base.update(lat["baseline"])
        for r in main_rows:
            r.update(lat[r["label"]])
    sweep_kse = [{"label": label, **run(f)} for label, f in SWEEP_KSE if (out / f / "model.kse").is_file()]
    sweep_l1 = [{"label": label, **run(f)} for label, f in SWEEP_L1 if (out / f / "model.kse").is_file()]
    ablation = [{"label": label, **run(f)} for label, f in ABLATION if (out / f / "model.kse").is_file()]
    no_ft = without_finetuning(out)
    recalibrated = {r["label"]: r["top1_recalibrated"] for r in no_ft}
    for r in main_rows:
        r["top1_recalibrated_no_finetuning"] = recalibrated.get(r["label"])
    result = {"threads": torch.get_num_threads(), "baseline": base, "main": main_rows, "sweep_kse": sweep_kse,
              "sweep_l1": sweep_l1, "ablation": ablation, "no_finetuning": no_ft}
    write_text(out / "results.json", json.dumps(result, indent=2))

    def lat_cells(r):
        if "b1_ms" not in r:
            return ["", ""]
        cells = [f"{r['b1_ms']:.2f} ms", f"{r['b64_ms']:.1f} ms"]
        if r is not base and "b1_ms" in base:
            cells = [f"{c} ({base[k] / r[k]:.2f}x)" for c, k in zip(cells, ("b1_ms", "b64_ms"))]
        return cells

    rows = [["baseline", f"{base['top1']:.2f}", "", f"{base['params'] / 1e3:.1f}K", f"{base['macs'] / 1e6:.2f}M",
             f"{base['file_bytes'] / 2**20:.2f} MiB", *lat_cells(base)]]
    for r in main_rows:
        rc = r["top1_recalibrated_no_finetuning"]
        rows.append([r["label"], f"{r['top1']:.2f}", "" if rc is None else f"{rc:.2f}",
                     f"{r['params'] / 1e3:.1f}K ({base['params'] / r['params']:.2f}x)",
                     f"{r['macs'] / 1e6:.2f}M ({base['macs'] / r['macs']:.2f}x)", f"{r['file_bytes'] / 2**20:.2f} MiB",
                     *lat_cells(r)])
    md = [markdown_table(["model", "top-1 (%)", "recalibrated, no fine-tuning (%)", "params", "MACs", "file",
                          "latency b1", "latency b64"], rows)]
    if no_ft:
        md.append(no_finetuning_table(no_ft, base))
    short = [["KSE " + r["label"], f"{r['macs'] / 1e6:.2f}M", f"{r['top1']:.2f}"] for r in sweep_kse]
    short += [[r["label"], f"{r['macs'] / 1e6:.2f}M", f"{r['top1']:.2f}"] for r in sweep_l1]
    if short:
        md.append(markdown_table(["sweep (short fine-tuning)", "MACs", "top-1 (%)"], short))
    if ablation:
        md.append(markdown_table(["ablation, G=4 (short fine-tuning)", "MACs", "params", "top-1 (%)"],
                                 [[r["label"], f"{r['macs'] / 1e6:.2f}M", f"{r['params'] / 1e3:.1f}K",
                                   f"{r['top1']:.2f}"] for r in ablation]))
    write_text(out / "results.md", "\n\n".join(md) + "\n")
    if sweep_kse and sweep_l1:
        plot(sweep_kse, sweep_l1, base, out / "accuracy_vs_macs.png")
    json.dump(result, sys.stdout, indent=2)
    print()
    print("\n\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
