"""``kse analyze`` (the per-layer KSE plan), ``kse compress`` (KSE, to G/T or to a budget),
``kse prune-l1`` (the L1-norm filter pruning baseline) and ``kse prune`` (L1 uniform or
Torch-Pruning's global group-magnitude pruning): commands that read a checkpoint and plan or
shrink it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .common import (CLIError, add_command, add_common, at_least, check_dataset_fits, checkpoint_path,
                     checkpoint_input_size, dataset_name, fake_input_size, finite_float, kse_config, kse_layers,
                     load_model, output_file, save_args, save_json, stage, write_model)


# ----------------------------------------------------------------------------- shared with kse demo
def compress_model(model: torch.nn.Module, args: argparse.Namespace, path: Path):
    """Compress in place; returns ``(plans, profile before, profile after)``."""
    from ..compress import compress_
    from ..profile import profile

    size = checkpoint_input_size(model, path)
    cfg = _with_target(kse_config(args, size), args)
    before = profile(model, size)
    example = torch.randn(2, *size, generator=torch.Generator().manual_seed(cfg.seed))
    try:
        plans = compress_(model, cfg, example_inputs=example)
    except ValueError as exc:
        hint = (" (the checkpoint is already KSE-compressed; compress its dense baseline instead)"
                if kse_layers(model) else "")
        text = str(exc)
        for field, flag in _TARGET_FLAGS:  # a budget error names the library's field: name the flag
            text = text.replace(f"{field}=", f"{flag} ")
        raise CLIError(f"{text}{hint}") from None
    return plans, before, profile(model, size)


# budget flags: (KSEConfig field, flag)
_TARGET_FLAGS = (("target_macs", "--target-macs"), ("target_params", "--target-params"),
                 ("target_bytes", "--target-size"), ("target_latency_ms", "--target-latency"))


def _with_target(cfg, args: argparse.Namespace):
    """``cfg`` with the budget of ``--target-*`` (``--latency-batch``, ``--allocation``), if any
    (commands without budget flags, such as ``kse demo``, get ``cfg`` back)."""
    import dataclasses

    if not hasattr(args, "target_macs"):
        return cfg
    given = {field: (flag, getattr(args, flag[2:].replace("-", "_"), None)) for field, flag in _TARGET_FLAGS}
    given = {field: (flag, value) for field, (flag, value) in given.items() if value is not None}
    batch, allocation = args.latency_batch, args.allocation
    if len(given) > 1:
        raise CLIError(f"give at most one of {', '.join(flag for _, flag in _TARGET_FLAGS)}; got "
                       f"{', '.join(flag for flag, _ in given.values())}")
    if batch is not None and "target_latency_ms" not in given:
        raise CLIError("--latency-batch applies to --target-latency only (the batch at which latency is measured)")
    if allocation is not None and not given:
        raise CLIError("--allocation applies to a budget only (--target-macs, --target-params, --target-size, "
                       "--target-latency)")
    if not given:
        return cfg
    try:
        return dataclasses.replace(cfg, **{f: v for f, (_, v) in given.items()},
                                   latency_batch=batch if batch is not None else 1, allocation=allocation or "auto")
    except (ValueError, TypeError) as exc:
        text = str(exc)  # the library names the field: name the flag
        for field, flag in (*_TARGET_FLAGS, ("latency_batch", "--latency-batch")):
            text = text.replace(field, flag)
        raise CLIError(text) from None


# ----------------------------------------------------------------------------- BatchNorm recalibration
def add_recalibrate_flags(p, default: str, batch_size: bool = True) -> None:
    """``--recalibrate N`` (shared by compress, prune-l1 and demo), with ``--batch-size`` for the
    commands that have no other use for it."""
    p.add_argument("--recalibrate", type=int, default=None, metavar="N",
                   help=f"re-estimate the BatchNorm statistics on N training batches, no labels or gradients "
                        f"({default}; 0: off); reads the checkpoint's dataset or --dataset, without augmentation, "
                        f"in a fixed order")
    if batch_size:
        p.add_argument("--batch-size", type=int, default=None, help="images per recalibration batch (default 128)")


def recalibration_loader(model: torch.nn.Module, args: argparse.Namespace, path: Path, standalone: bool = True):
    """``(loader, dataset name)`` of the training batches ``--recalibrate`` reads, checked before
    any work: the dataset fits the model and has enough batches. ``None`` when ``--recalibrate``
    is 0 or not given (``standalone``: then ``--dataset`` / ``--data-dir`` are an error, as they
    would be unused)."""
    from ..recalibrate import batchnorm_layers, calibration_loader

    at_least("--recalibrate", args.recalibrate, 0)
    at_least("--batch-size", args.batch_size, 1)
    if not args.recalibrate:
        if standalone and (args.dataset or args.data_dir):
            raise CLIError("--dataset and --data-dir only tell --recalibrate N where the training images are; "
                           "add --recalibrate (e.g. 100) or leave them out")
        return None
    if not batchnorm_layers(model):
        raise CLIError(f"--recalibrate: {path} has no BatchNorm layer with running statistics, so there is nothing "
                       "to recalibrate; leave --recalibrate out")
    name = dataset_name(model, args, path)
    # NOTE: the same images in the same order for every model (seed 0), so that recalibrated
    # accuracies of different compressions compare
    loader, info = calibration_loader(name, args.data_dir, args.batch_size, seed=0,
                                      fake_size=getattr(args, "fake_size", None) or 256,
                                      input_size=fake_input_size(model))
    check_dataset_fits(model, info, path)
    if len(loader) < args.recalibrate:
        raise CLIError(f"--recalibrate {args.recalibrate}: the {name} training split has only {len(loader)} batches "
                       f"of {args.batch_size} images; lower --recalibrate or --batch-size")
    return loader, name


def print_recalibrated(done: Optional[Dict[str, Any]]) -> None:
    if done:
        print(f"BatchNorm statistics of {done['batchnorm_layers']} layers recalibrated on {done['batches']} "
              f"{done['dataset']} training batches of {done['batch_size']} images")


def recalibrate(model: torch.nn.Module, data, args: argparse.Namespace, command: str, say: bool = True) -> Dict[str, Any]:
    """Recalibrate ``model``'s BatchNorm statistics on ``args.recalibrate`` batches of ``data``
    (from :func:`recalibration_loader`); returns what was done, for the file's metadata."""
    from ..recalibrate import batchnorm_layers, recalibrate_bn_

    loader, name = data
    n_bn = len(batchnorm_layers(model))
    if say:
        stage(command, f"recalibrating {n_bn} BatchNorm layers on {args.recalibrate} training batches of "
                       f"{args.batch_size} images (no augmentation, no gradients)")
    try:
        recalibrate_bn_(model, loader, batches=args.recalibrate)
    except ValueError as exc:
        raise CLIError(f"--recalibrate: {exc}") from None
    return {"batches": args.recalibrate, "batch_size": args.batch_size, "dataset": name, "split": "train",
            "augmentation": False, "order_seed": 0, "batchnorm_layers": n_bn}


def print_layer_table(rows, planned: bool) -> None:
    from ..report import text_table

    def stat(v):
        return "-" if v is None else f"{v:.3f}"

    table = [[r["name"], r["in_channels"], r["out_channels"], r["kept"], r["centroids"], f"{r['ratio']:.2f}x",
              stat(r["indicator_min"]), stat(r["indicator_mean"]), stat(r["indicator_max"])] for r in rows]
    headers = ["layer", "C_in", "N", "kept", "centroids", "ratio", "v_min", "v_mean", "v_max"]
    if not planned:
        headers, table = headers[:6] + ["form"], [t[:6] + [r["form"]] for t, r in zip(table, rows)]
    print(text_table(headers, table))


def print_profiles(before, after, sizes: Optional[tuple] = None) -> None:
    from ..report import fmt_bytes, fmt_count, fmt_ratio, text_table

    rows = [["params", fmt_count(before.params), fmt_count(after.params), fmt_ratio(before.params, after.params)],
            ["MACs", fmt_count(before.macs), fmt_count(after.macs), fmt_ratio(before.macs, after.macs)],
            ["fusion adds", fmt_count(before.fusion_adds), fmt_count(after.fusion_adds), ""],
            ["stored size", fmt_bytes(before.stored_bytes), fmt_bytes(after.stored_bytes),
             fmt_ratio(before.stored_bytes, after.stored_bytes)]]
    if sizes:
        rows.append(["file size", fmt_bytes(sizes[0]), fmt_bytes(sizes[1]), fmt_ratio(*sizes)])
    print(text_table(["", "before", "after", "ratio"], rows))


# ----------------------------------------------------------------------------- analyze
def _analysis(model: torch.nn.Module, args: argparse.Namespace, path: Path) -> Dict[str, Any]:
    from ..compress import plan
    from ..report import kse_layer_summary, layer_summary, summary_totals

    size = checkpoint_input_size(model, path)
    cfg = kse_config(args, size)
    existing = kse_layer_summary(model)
    try:
        example = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
        rows = layer_summary(plan(model, cfg, example))
    except ValueError as exc:
        if not existing:
            raise CLIError(str(exc)) from None
        rows = []  # already compressed: report the KSE layers it has
    return {"checkpoint": str(path), "arch": model.kse_arch.get("name"), "config": cfg.to_dict(),
            "planned": rows, "planned_totals": summary_totals(rows) if rows else None,
            "compressed": existing, "compressed_totals": summary_totals(existing) if existing else None,
            "feature_reuse": _feature_reuse(model, cfg)}


def _feature_reuse(model: torch.nn.Module, cfg) -> Optional[List[Any]]:
    """The DenseNet feature-reuse map (kse.feature_reuse) when the model has dense blocks whose
    layers are not compressed yet; ``None`` otherwise."""
    from ..feature_reuse import feature_reuse, find_dense_blocks

    blocks = find_dense_blocks(model)
    if not blocks or any(type(model.get_submodule(n)) is not torch.nn.Conv2d for b in blocks for n in b.layers):
        return None
    return feature_reuse(model, cfg)


def _print_feature_reuse(blocks, G: int) -> None:
    """Per dense block, the fraction of channels KSE drops by source, over all the layers reading it."""
    for block in blocks:
        n = len(block.layers)  # source i (0 = block input, i = layer i-1) is read by layers i..n-1
        dropped = [sum(block.dropped_fraction[j][i] for j in range(i, n)) / (n - i) for i in range(n)]
        cells = " ".join(f"{d:.2f}" for d in dropped)
        print(f"feature reuse, {block.block} ({n} layers, growth {block.growth}): fraction of channels dropped at "
              f"G={G} by source (block input, then layer 0..{n - 2}), over the layers reading it: {cells}")


def cmd_analyze(args: argparse.Namespace) -> int:
    from ..report import plot_layers

    path = checkpoint_path(args)
    kse_config(args)  # a bad --G fails before the model is read
    model = load_model(path)
    result = _analysis(model, args, path)
    reuse = result.pop("feature_reuse")
    if reuse is not None:
        result["feature_reuse"] = [b.to_dict() for b in reuse]
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_args(args, out)
        save_json(out / "analysis.json", result)
        rows = result["planned"] or result["compressed"]
        plot_layers(rows, out / "analysis.png", G=args.G if result["planned"] else None,
                    title=f"{path.name}: KSE G={args.G} T={args.T} alpha={args.alpha}")
        result_files = [out / "analysis.json", out / "analysis.png", out / "args.json"]
        if reuse is not None:
            from ..feature_reuse import plot_feature_reuse

            result_files.insert(2, plot_feature_reuse(reuse, out / "feature_reuse.png",
                                                      title=f"{path.name}: feature reuse, KSE G={args.G} T={args.T}"))
    else:
        result_files = []
    if args.json:
        print(json.dumps(result, default=str))
    else:
        cfg = result["config"]
        for key, planned in (("planned", True), ("compressed", False)):
            rows, totals = result[key], result[f"{key}_totals"]
            if not rows:
                continue
            print(f"{'KSE plan' if planned else 'KSE layers already in the model'} for {path} "
                  f"({result['arch']}" + (f", G={cfg['G']} T={cfg['T']} alpha={cfg['alpha']})" if planned else ")"))
            print_layer_table(rows, planned)
            print(f"total: {totals['layers']} layers, input channels kept {totals['kept']}/{totals['in_channels']}, "
                  f"{totals['centroids']} centroids for {totals['kernels']} kernels ({totals['ratio']:.2f}x)\n")
        if reuse is not None:
            _print_feature_reuse(reuse, cfg["G"])
        for f in result_files:
            print(f"wrote {f}")
    return 0


# ----------------------------------------------------------------------------- compress
def cmd_compress(args: argparse.Namespace) -> int:
    from ..report import layer_summary

    path = checkpoint_path(args)
    out = output_file(args, path, "the compressed .kse file to write")
    _with_target(kse_config(args), args)  # bad flags fail before the model is read
    model = load_model(path)
    data = recalibration_loader(model, args, path)
    plans, before, after = compress_model(model, args, path)
    extra = {**(getattr(model, "kse_extra", None) or {}),
             "compressed_from": str(path), "baseline": {"params": before.params, "macs": before.macs}}
    extra.pop("recalibrated", None)  # the statistics change: an earlier recalibration no longer holds
    if data is not None:
        extra["recalibrated"] = recalibrate(model, data, args, "compress")
    budget = getattr(model, "kse_budget", None)
    if budget is not None:
        extra["budget"] = budget
    write_model(args, model, out, extra)
    print_layer_table(layer_summary(plans), planned=True)
    print()
    print_profiles(before, after, (path.stat().st_size, out.stat().st_size))
    print_recalibrated(extra.get("recalibrated") if data is not None else None)
    if budget is not None:
        print(budget["line"])
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- prune-l1, prune
_PRUNE_NAMES = {"l1": "L1 filter pruning (uniform)", "tp-global": "Torch-Pruning global group-magnitude pruning"}


def cmd_prune_l1(args: argparse.Namespace) -> int:
    return _prune(args, "prune-l1", "l1", "l1_prune")


def cmd_prune(args: argparse.Namespace) -> int:
    return _prune(args, "prune", args.method, "prune")


def _prune(args: argparse.Namespace, command: str, method: str, key: str) -> int:
    """Filter pruning of a dense checkpoint by ``method`` to a ratio, a MAC budget or another
    file's MACs, optionally recalibrated; the record goes into the file's extra under ``key``."""
    from ..budget import parse_target, resolve_target
    from ..filter_prune import l1_prune_, prune_to_macs, tp_global_prune_
    from ..profile import profile
    from ..report import fmt_count

    path = checkpoint_path(args)
    out = output_file(args, path, "the pruned .kse file to write")
    targets = [f for f, v in (("--ratio", args.ratio), ("--macs", args.macs), ("--match", args.match)) if v is not None]
    if len(targets) != 1:
        raise CLIError("give exactly one of --ratio (fraction of filters to remove), --macs (a MAC budget such as "
                       f"40M or 2x) or --match (a .kse file whose MACs to match); got {', '.join(targets) or 'none'}")
    try:
        macs = parse_target(args.macs, "macs", "--macs") if args.macs is not None else None
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.match is not None and not Path(args.match).is_file():
        raise CLIError(f"--match: file not found: {args.match}")
    model = load_model(path)
    if kse_layers(model):
        raise CLIError(f"{path} is KSE-compressed; filter pruning starts from a dense baseline")
    size = checkpoint_input_size(model, path)
    data = recalibration_loader(model, args, path)
    example = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    before = profile(model, size)
    try:
        if args.ratio is not None:
            prune_ = l1_prune_ if method == "l1" else tp_global_prune_
            removed, ratio = prune_(model, args.ratio, args.layers, example), args.ratio
        else:
            target = resolve_target(macs, before.macs) if macs is not None else None
            if args.match is not None:
                matched = load_model(Path(args.match), "--match")
                target = profile(matched, checkpoint_input_size(matched, Path(args.match))).macs
            stage(command, f"searching the pruning ratio for {fmt_count(target)} MACs ({method})")
            model, ratio, removed = prune_to_macs(model, float(target), args.layers, example, method=method)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    after = profile(model, size)
    extra = {**(getattr(model, "kse_extra", None) or {}), "pruned_from": str(path),
             key: {"method": method, "ratio": ratio, "layers": list(args.layers),
                   "removed": {k: len(v) for k, v in removed.items()},
                   "baseline": {"params": before.params, "macs": before.macs}}}
    extra.pop("recalibrated", None)
    if data is not None:
        extra["recalibrated"] = recalibrate(model, data, args, command)
    write_model(args, model, out, extra)
    print(f"{_PRUNE_NAMES[method]}, ratio {ratio:.4f}: {sum(len(v) for v in removed.values())} filters removed "
          f"in {len(removed)} layers ({', '.join(args.layers)})")
    print_profiles(before, after, (path.stat().st_size, out.stat().st_size))
    print_recalibrated(extra.get("recalibrated") if data is not None else None)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- parsers
def register(subparsers) -> None:
    p = add_command(subparsers, "analyze", cmd_analyze, folder_out=True,
                    defaults=dict(G=4, T=0, alpha=1.0, json=False),
                    help="per-layer KSE plan of a checkpoint (indicator, channels kept, centroids)",
                    description="Score every eligible convolution of a checkpoint with the KSE indicator and show "
                                "what KSE would keep (no data needed; the model is not changed). With --out, "
                                "writes analysis.json and analysis.png there. For a DenseNet, also the feature-reuse "
                                "map: per dense block, the mean indicator and the fraction of channels dropped of "
                                "each layer's inputs grouped by the earlier layer that produced them "
                                "(feature_reuse.png).")
    add_common(p, "checkpoint", "out", "G", "T", "alpha")
    p.add_argument("--include", nargs="+", default=None, metavar="PAT", help="glob patterns of layers to consider")
    p.add_argument("--exclude", nargs="+", default=None, metavar="PAT", help="glob patterns of layers to skip")
    p.add_argument("--json", action="store_true", default=None, help="print the analysis as one JSON object")

    p = add_command(subparsers, "compress", cmd_compress,
                    defaults=dict(G=4, T=0, alpha=1.0, seed=0, score="kse", entropy_layout="paper", recalibrate=0,
                                  batch_size=128),
                    help="compress a checkpoint with KSE",
                    description="Load a .kse checkpoint, compress it with KSE (docs/method.md §1-5), optionally "
                                "recalibrate its BatchNorm statistics on training images (--recalibrate, "
                                "docs/recalibration.md) and save the result; prints the per-layer plan and "
                                "params / MACs before and after.")
    add_common(p, "checkpoint", "out", "G", "T", "alpha", "seed", "dataset", "data-dir")
    add_recalibrate_flags(p, "default 0")
    p.add_argument("--include", nargs="+", default=None, metavar="PAT", help="glob patterns of layers to compress")
    p.add_argument("--exclude", nargs="+", default=None, metavar="PAT", help="glob patterns of layers to leave alone")
    p.add_argument("--score", choices=["kse", "sparsity", "entropy"], default=None,
                   help="ablations: rank input channels by sparsity or entropy alone (default: kse, Eq. 7)")
    p.add_argument("--entropy-layout", choices=["paper", "official"], default=None,
                   help="ablation: 'official' reproduces the authors' code's entropy layout bug (default: paper)")
    p.add_argument("--n-init", type=int, default=None, metavar="K",
                   help="k-means starts per centroid count, the best kept (default 1; the authors' code: 10)")
    p.add_argument("--channel-multiple", type=int, default=None, metavar="M",
                   help="keep each shrunk producer's width a multiple of M when removing dead channels "
                        "(default 8, widths fast kernels handle well; 1: remove every dead channel)")
    # a budget (at most one of the four): G and T are then searched (docs/budget.md)
    p.add_argument("--target-macs", default=None, metavar="N",
                   help="a budget (G and T are then searched): at most this many MACs, e.g. 40M, 1.5G, or a "
                        "ratio to the input such as 2.5x")
    p.add_argument("--target-params", default=None, metavar="N", help="at most this many parameters: 300K, 2x")
    p.add_argument("--target-size", default=None, metavar="BYTES",
                   help="at most this stored size (as the 'stored size' row counts it): 1MiB, 800KB, 2x")
    p.add_argument("--target-latency", default=None, metavar="MS",
                   help="at most this latency on this machine, measured: 3ms, 1.5x")
    p.add_argument("--latency-batch", type=int, default=None, metavar="B",
                   help="batch size at which --target-latency is measured (default 1)")
    p.add_argument("--allocation", choices=["auto", "global", "per-layer"], default=None,
                   help="with a budget: auto (one global G/T when one is within 2%%, else per layer), global "
                        "(the paper's rule only: the nearest global G/T under the target) or per-layer")

    p = add_command(subparsers, "prune-l1", cmd_prune_l1, defaults=dict(layers=["*.conv1"], recalibrate=0,
                                                                         batch_size=128),
                    help="L1-norm filter pruning (Li et al. 2017), the peer KSE is compared to",
                    description="Remove the output filters of smallest L1 norm from the selected convolutions "
                                "(default: the first conv of every residual block, as Li et al. do for ResNet-56), "
                                "with Torch-Pruning's DependencyGraph; the same fraction in every layer, given or "
                                "searched to meet a MAC budget; optionally recalibrates the BatchNorm statistics "
                                "(--recalibrate). Writes a dense .kse file for `kse finetune`.")
    add_common(p, "checkpoint", "out", "dataset", "data-dir")
    add_recalibrate_flags(p, "default 0")
    p.add_argument("--ratio", type=finite_float, default=None, help="fraction of filters to remove in each layer, in [0, 1)")
    p.add_argument("--macs", default=None, metavar="N", help="MAC budget of the pruned model: 40M, or 2x fewer")
    p.add_argument("--match", default=None, metavar="KSE_FILE", help="match the MACs of this model (e.g. a KSE one)")
    p.add_argument("--layers", nargs="+", default=None, metavar="PAT", help="glob patterns of the convs to prune")

    p = add_command(subparsers, "prune", cmd_prune, defaults=dict(layers=["*.conv1"], method="tp-global", recalibrate=0,
                                                                   batch_size=128),
                    help="filter pruning peers: L1 uniform or Torch-Pruning's global group-magnitude pruning",
                    description="Remove output filters from the selected convolutions (default: the first conv of "
                                "every residual block, the only ones an option-A ResNet can narrow) with Torch-"
                                "Pruning's DependencyGraph. --method tp-global ranks all their filters together by "
                                "the L2 norm of their dependency group (each layer's scores divided by their mean) "
                                "and removes the weakest (layers lose different fractions, none more than 90 percent); "
                                "--method l1 removes the same fraction of smallest-L1 filters in every layer (as "
                                "kse prune-l1). A ratio given or searched to meet a MAC budget; optionally recalibrates the "
                                "BatchNorm statistics (--recalibrate). Writes a dense .kse file for `kse finetune`.")
    add_common(p, "checkpoint", "out", "dataset", "data-dir")
    add_recalibrate_flags(p, "default 0")
    p.add_argument("--method", choices=["tp-global", "l1"], default=None, help="default: tp-global")
    p.add_argument("--ratio", type=finite_float, default=None,
                   help="fraction of filters to remove, in [0, 1) (tp-global: of all selected filters together)")
    p.add_argument("--macs", default=None, metavar="N", help="MAC budget of the pruned model: 40M, or 2x fewer")
    p.add_argument("--match", default=None, metavar="KSE_FILE", help="match the MACs of this model (e.g. a KSE one)")
    p.add_argument("--layers", nargs="+", default=None, metavar="PAT", help="glob patterns of the convs to prune")
