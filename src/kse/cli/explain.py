"""``kse explain``: what the KSE indicator says about each input feature map of a checkpoint,
tested on real images (:mod:`kse.explain`): scores, agreement with the exact ablation
importance, the top-1 left when each score chooses the channels KSE drops, and pictures."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from ..ablation import DEFAULT_ROWS
from .common import (CLIError, add_command, add_common, at_least, busy_note, check_dataset_fits, checkpoint_input_size,
                     checkpoint_path, dataset_name, fake_input_size, kse_config, kse_layers, load_model, parse_device,
                     save_args, set_threads, stage)


def cmd_explain(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader, Subset

    from ..data import get_dataset
    from ..explain import choose_images, explain, match_layers
    from ..explain_plots import summary, write_report

    path = checkpoint_path(args)
    at_least("--images", args.images, 1)
    at_least("--batch-size", args.batch_size, 1)
    at_least("--eval-images", args.eval_images, 0)
    at_least("--recal-batches", args.recal_batches, 0)
    at_least("--rows", args.rows, 1)
    at_least("--bootstrap", args.bootstrap, 1)
    at_least("--seed", args.seed, 0)
    set_threads(args.threads)
    device = parse_device(args.device)
    cfg = kse_config(argparse.Namespace(G=args.G, T=args.T, alpha=args.alpha))
    model = load_model(path)
    if kse_layers(model):
        raise CLIError(f"{path} is already KSE-compressed; explain its dense baseline")
    size = checkpoint_input_size(model, path)
    cfg = kse_config(argparse.Namespace(G=args.G, T=args.T, alpha=args.alpha), size)
    name = dataset_name(model, args, path)
    test_ds, info = get_dataset(name, args.data_dir, False, fake_size=args.fake_size,
                                input_size=fake_input_size(model))
    check_dataset_fits(model, info, path)
    chosen, rest = choose_images(len(test_ds), args.images, args.seed)
    if args.eval_images:
        rest = rest[:args.eval_images]
    batch = [test_ds[i] for i in chosen]
    images = torch.stack([x for x, _ in batch])
    labels = torch.tensor([int(y) for _, y in batch])
    # every argument checked before the work starts
    names = match_layers(model, args.layers, cfg, images[:2])
    if args.show_layer is not None and args.show_layer not in names:
        raise CLIError(f"--show-layer {args.show_layer!r} is not among the explained layers "
                       f"({', '.join(names[:4])}{' ...' if len(names) > 4 else ''})")
    eval_loader = recal_loader = None
    if args.drop and rest:
        eval_loader = DataLoader(Subset(test_ds, rest), batch_size=max(args.batch_size, 256))
        if args.recal_batches:
            # the training split without augmentation, in file order: every recalibration (and run) sees
            # the same images, whichever thread does it
            plain, _ = get_dataset(name, args.data_dir, True, fake_size=args.fake_size,
                                   input_size=fake_input_size(model), augment=False)
            if len(plain) < args.recal_batches * args.batch_size:
                raise CLIError(f"--recal-batches {args.recal_batches} x --batch-size {args.batch_size} needs "
                               f"{args.recal_batches * args.batch_size} training images, {name} has {len(plain)}")
            recal_loader = DataLoader(plain, batch_size=args.batch_size, shuffle=False)
    busy_note("explain")
    stage("explain", f"{path.name}: {len(chosen)} {name} test images "
                     + ("(the first ones)" if args.seed is None else f"(drawn with seed {args.seed})"))
    if args.drop and not rest:
        stage("explain", "no test images are left for the channel-dropping table (--images takes them all); skipped")
    model = model.to(device).eval()
    load_start = _load_average()
    t0 = time.time()
    result = explain(model, images, labels, layers=names, config=cfg, eval_loader=eval_loader,
                     recal_loader=recal_loader, recal_batches=args.recal_batches, rows=args.rows,
                     batch_size=args.batch_size, resamples=args.bootstrap, seed=args.seed or 0,
                     show_layer=args.show_layer, progress=lambda msg: stage("explain", msg))
    run: Dict[str, Any] = {"checkpoint": str(path), "dataset": name, "images": "first" if args.seed is None else
                           f"seed {args.seed}", "eval_images": len(rest) if eval_loader is not None else 0,
                           "device": str(device), "threads": torch.get_num_threads(),
                           "seconds": round(time.time() - t0, 1),
                           "load_average_1min": {"start": load_start, "end": _load_average()}}
    files: List[Path] = []
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_args(args, out)
        files = write_report(result, out, command=_command_line(args), extra=run)
    if args.json:
        data = result.to_dict()
        data["run"] = run
        print(json.dumps(data))
    else:
        for line in summary(result):
            print(line)
        _print_tables(result)
        for f in files:
            print(f"wrote {f}")
    return 0


def _load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on this platform
        return None


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (resolved values of the flags that shape it)."""
    parts = ["kse", "explain"]
    for flag in ("checkpoint", "dataset", "data_dir", "layers", "images", "seed", "G", "T", "alpha", "eval_images",
                 "recal_batches", "batch_size", "rows", "bootstrap", "show_layer", "device", "threads", "out"):
        value = getattr(args, flag, None)
        if value is None:
            continue
        parts.append("--" + flag.replace("_", "-"))
        parts += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    if not args.drop:
        parts.append("--no-drop")
    return " ".join(shlex.quote(p) for p in parts)


def _print_tables(result) -> None:
    from ..explain import AGREEMENT_SCORES, SCORE_TITLES
    from ..report import text_table

    def rho(a):
        if a["rho"] is None:
            return "n/a"
        lo, hi = a["ci95"]
        return f"{a['rho']:+.2f} [{lo:+.2f}, {hi:+.2f}]"

    rows = [[SCORE_TITLES[s], rho(result.agreement[s]["mean_within_layer"]), rho(result.agreement[s]["pooled"])]
            for s in AGREEMENT_SCORES if s in result.agreement]
    if result.split_half is not None:
        rows.append(["ablation, half vs half", rho(result.split_half["mean_within_layer"]),
                     rho(result.split_half["pooled"])])
    print("\nSpearman rho with the ablation importance (95% bootstrap interval)")
    print(text_table(["score", "mean within layer", "pooled"], rows))
    if result.drop:
        rows = [[SCORE_TITLES[s], r["dropped"], f"{r['top1_dropped_only']:.2f}%", f"{r['top1']:.2f}%",
                 f"{r['top1_recalibrated']:.2f}%" if "top1_recalibrated" in r else "-"]
                for s, r in result.drop["rows"].items()]
        print(f"\ntop-1 with KSE G={result.settings['G']}'s number of channels dropped, chosen by each score "
              f"(intact model {result.drop['baseline_top1']:.2f}%)")
        print(text_table(["channels chosen by", "dropped", "top-1 dropped only", "+ clustered",
                          "+ BatchNorm recalibrated"], rows))


def register(subparsers) -> None:
    p = add_command(subparsers, "explain", cmd_explain, folder_out=True,
                    defaults=dict(G=4, T=0, alpha=1.0, images=256, batch_size=128, eval_images=2000, recal_batches=8,
                                  rows=DEFAULT_ROWS, bootstrap=1000, json=False, drop=True, fake_size=256),
                    help="test what the KSE indicator says about each feature map against real images",
                    description="For every input feature map of the chosen layers: KSE's sparsity, entropy, "
                                "indicator and centroid count (no data), the L1 norm of the filter producing it, and, "
                                "on real test images, its exact ablation importance (loss increase and top-1 drop "
                                "when the map is zeroed), a first-order Taylor estimate and its mean activation. "
                                "Reports each score's Spearman rank correlation with the ablation importance "
                                "(bootstrap 95% intervals), and the top-1 left when each score chooses the "
                                "channels KSE drops, before and after re-estimating BatchNorm statistics. With --out, "
                                "writes report.md, explain.json and pictures there. Default images: the first N of "
                                "the test split (--seed draws others); the channel-dropping table is measured on "
                                "the test images after them. See docs/explain.md.")
    add_common(p, "checkpoint", "dataset", "data-dir", "out", "G", "T", "alpha", "device")
    p.add_argument("--seed", type=int, default=None,
                   help="draw the images at random with this seed (default: the first N of the test split); also "
                        "seeds the random score and the bootstrap (default 0)")
    p.add_argument("--layers", nargs="+", default=None, metavar="PAT",
                   help="glob patterns of the layers to explain (default: every layer KSE compresses)")
    p.add_argument("--images", type=int, default=None, metavar="N", help="test images scored (default 256)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward/backward of the Taylor pass and per BatchNorm batch (default 128)")
    p.add_argument("--eval-images", type=int, default=None, metavar="M",
                   help="test images (after the scored ones) for the channel-dropping table (default 2000; 0: all)")
    p.add_argument("--recal-batches", type=int, default=None, metavar="K",
                   help="batches of unaugmented training images to re-estimate BatchNorm statistics with "
                        "(default 8; 0: no recalibrated column)")
    p.add_argument("--no-drop", dest="drop", action="store_false", default=None,
                   help="skip the channel-dropping table")
    p.add_argument("--rows", type=int, default=None,
                   help=f"image copies per forward in the ablation, channels x images (default {DEFAULT_ROWS}; "
                        "memory grows with it)")
    p.add_argument("--bootstrap", type=int, default=None, metavar="R", help="bootstrap resamples (default 1000)")
    p.add_argument("--show-layer", default=None, metavar="NAME",
                   help="the layer whose feature maps feature_maps.png shows (default: the middle one)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--fake-size", type=int, default=None, help="FakeData train size (for a fake checkpoint)")
    p.add_argument("--json", action="store_true", default=None,
                   help="print one JSON object: per-layer, per-channel scores, correlations and the table")
