"""The ``kse`` command: a thin layer over the library.

    kse train     train a baseline            kse eval      accuracy, size, MACs, CPU latency
    kse models    list model names            kse export    ONNX + TorchScript, verified
    kse analyze   per-layer KSE plan          kse bench     per-layer and model latency
    kse compress  KSE-compress a checkpoint   kse demo      the whole pipeline, with a report
    kse finetune  fine-tune the centroids

Every subcommand has ``--help`` and takes ``--config FILE.yaml`` for its defaults; commands
that write files save their resolved arguments beside them (``args.json``). Expected errors (missing or corrupt file, unknown model or
dataset, out-of-range value) print one line and exit with status 2, no traceback.

``kse train`` runs unchanged under ``torchrun --nproc_per_node N``: with ``WORLD_SIZE > 1`` it
joins the process group (nccl on CUDA, one GPU per process; gloo on CPU), wraps the model in
DistributedDataParallel, and only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

EXPECTED_ERRORS = (ValueError, TypeError, OSError, FloatingPointError, KeyError)

# subcommands whose --out is a folder (the others write one .kse file)
_FOLDER_OUT = {"train", "analyze", "finetune", "export", "demo"}


class CLIError(Exception):
    """An expected error, printed as one line."""


# ----------------------------------------------------------------------------- arguments
def _common(p: argparse.ArgumentParser, *names: str) -> None:
    """Add the flags shared by several subcommands, with one spelling everywhere."""
    spec = {
        "arch": dict(default=None, help="model name (see `kse models`); default: from --checkpoint, else resnet56"),
        "dataset": dict(default=None, help="dataset name (default: fashion-mnist, or the checkpoint's)"),
        "data-dir": dict(default=None, help="where the dataset lives (default: $KSE_DATA, then system paths)"),
        "checkpoint": dict(default=None, help="a .kse file to start from"),
        "out": dict(default=None, help="output file or folder"),
        "G": dict(type=int, default=None, help="KSE groups G (>= 2; default 4)"),
        "T": dict(type=int, default=None, help="KSE shift T (>= 0; default 0)"),
        "alpha": dict(type=float, default=None, help="entropy weight alpha (>= 0; default 1)"),
        "epochs": dict(type=int, default=None, help="number of epochs"),
        "lr": dict(type=float, default=None, help="peak learning rate"),
        "batch-size": dict(type=int, default=None, help="batch size per process"),
        "device": dict(default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"),
        "seed": dict(type=int, default=None, help="random seed (default 0)"),
    }
    for n in names:
        p.add_argument(f"--{n}", **spec[n])


def _config_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML file whose keys set this command's defaults")


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser, defaults: Dict[str, Any]) -> argparse.Namespace:
    """Fill unset flags from ``--config`` (YAML), then from ``defaults``."""
    cfg: Dict[str, Any] = {}
    if getattr(args, "config", None):
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise CLIError(f"config file not found: {path}")
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise CLIError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from None
        if not isinstance(cfg, dict):
            raise CLIError(f"config file {path} must hold a mapping of flag names to values")
        known = {a.dest for a in parser._actions}
        for key in cfg:
            if key.replace("-", "_") not in known:
                raise CLIError(f"config file {path}: unknown key {key!r}")
    for key, value in {**defaults, **{k.replace("-", "_"): v for k, v in cfg.items()}}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device: unknown device {name!r}; use cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def _save_args(args: argparse.Namespace, folder: Path, name: str = "args.json") -> None:
    from .atomic import write_text
    from .train import is_main_process

    if is_main_process():
        data = {k: v for k, v in vars(args).items() if k != "func"}
        write_text(folder / name, json.dumps(data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- distributed
def _world_size() -> int:
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise CLIError(f"environment variable WORLD_SIZE must be an integer, got {raw!r}") from None


def _init_distributed(device: torch.device) -> torch.device:
    """Join the process group that ``torchrun`` describes; return this process's device."""
    import torch.distributed as dist

    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise CLIError(f"LOCAL_RANK {local_rank} has no GPU (this machine has {torch.cuda.device_count()}); "
                           "use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local_rank)  # NOTE: one GPU per process; an index in --device is ignored
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _run_distributed(job: Callable[[], int]) -> int:
    """Run ``job`` in the process group, then tear the group down once every rank is done: a
    rank that left first made its peer abort in gloo's teardown ("terminate called without an
    active exception", about one run in six of tests/test_distributed.py)."""
    import torch.distributed as dist

    try:
        rc = job()
        dist.barrier()
        return rc
    finally:
        dist.destroy_process_group()


def _wrap_ddp(model: torch.nn.Module, device: torch.device, sync_bn: bool) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _revert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Undo ``convert_sync_batchnorm``: plain ``BatchNorm2d`` layers holding the same state."""
    if isinstance(module, torch.nn.SyncBatchNorm):
        bn = torch.nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats)
        bn.load_state_dict(module.state_dict())  # onto the CPU: the caller exports from there
        return bn.train(module.training)
    for name, child in list(module.named_children()):
        new = _revert_sync_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


# ----------------------------------------------------------------------------- train
def _loaders(dataset: str, data_dir: Optional[str], batch_size: int, workers: int = 0, fake_size: int = 256,
             input_size: Optional[int] = None, seed: int = 0):
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from .data import ShardSampler, get_dataset

    train_ds, info = get_dataset(dataset, data_dir, True, fake_size=fake_size, input_size=input_size)
    test_ds, _ = get_dataset(dataset, data_dir, False, fake_size=fake_size, input_size=input_size)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    train_sampler = DistributedSampler(train_ds, shuffle=True, seed=seed) if distributed else None
    test_sampler = (ShardSampler(test_ds, torch.distributed.get_rank(), torch.distributed.get_world_size())
                    if distributed else None)
    train = DataLoader(train_ds, batch_size, shuffle=train_sampler is None, sampler=train_sampler,
                       num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    test = DataLoader(test_ds, 256, shuffle=False, sampler=test_sampler, num_workers=workers)
    return train, test, info


def cmd_train(args: argparse.Namespace) -> int:
    from .data import dataset_info
    from .models import list_models

    # Cheap checks first, so that a typo fails before any data is loaded.
    if args.arch not in list_models():
        raise CLIError(f"--arch: unknown model {args.arch!r}; choose one of: {', '.join(list_models())}")
    dataset_info(args.dataset)
    weights = _pretrained_weights(args.arch, args.weights)
    device = _device(args.device)
    distributed = _world_size() > 1
    if args.epochs == 0:
        if weights is None:
            raise CLIError("epochs must be an integer >= 1, got 0; --epochs 0 is only for saving --weights "
                           "(torchvision pretrained weights) untrained")
        if distributed:
            raise CLIError("--epochs 0 only saves the --weights model; run it without torchrun")
        return _save_pretrained(args, weights)
    if args.sync_bn and distributed and device.type != "cuda":
        raise CLIError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); drop it for CPU runs")
    if not distributed:
        if args.sync_bn:
            print("kse train: note: --sync-bn has no effect in a single process", file=sys.stderr)
        return _train(args, device, distributed=False)
    device = _init_distributed(device)
    return _run_distributed(lambda: _train(args, device, distributed=True))


def _pretrained_weights(arch: str, weights: Optional[str]) -> Optional[str]:
    """``--weights``: ``None`` (random initialisation) or the full torchvision name, e.g.
    ``"ResNet50_Weights.IMAGENET1K_V2"`` for ``--arch resnet50 --weights DEFAULT``."""
    if weights is None or str(weights).lower() == "none":
        return None
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise CLIError(f"--weights: {arch!r} is not a torchvision model and has no pretrained weights; "
                       "drop --weights (or pass --weights none)")
    enum = torchvision.models.get_model_weights(arch)
    name = str(weights).rsplit(".", 1)[-1]  # "IMAGENET1K_V2" or "ResNet50_Weights.IMAGENET1K_V2"
    if name not in enum.__members__:
        raise CLIError(f"--weights: {arch} has no weights {weights!r}; choose one of: "
                       f"{', '.join(enum.__members__)} (or none)")
    return str(enum[name])


def _build_model(args: argparse.Namespace, info, weights: Optional[str]) -> torch.nn.Module:
    from .models import get_model

    if weights is None:
        return get_model(args.arch, num_classes=info.num_classes, in_channels=info.in_channels)
    try:
        model = get_model(args.arch, num_classes=info.num_classes, in_channels=info.in_channels, weights=weights)
    except (OSError, RuntimeError) as exc:  # no network (URLError is an OSError), damaged file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"--weights {weights}: could not load them ({reason}); torchvision keeps downloaded "
                       "weights in $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints): run once "
                       "with network access or copy the file there") from None
    # NOTE: the weights travel in the saved state dict; kse.load must rebuild the bare architecture
    # (no download), so they are not part of the recorded build arguments.
    model.kse_arch["kwargs"].pop("weights", None)
    return model


def _save_pretrained(args: argparse.Namespace, weights: str) -> int:
    """``kse train --weights W --epochs 0``: save torchvision's pretrained model as OUT/model.kse."""
    from .data import dataset_info, get_dataset
    from .serialization import save

    info = dataset_info(args.dataset)
    if args.dataset == "fake" or not info.num_classes:  # FakeData's size is --input-size; imagefolder counts classes
        _, info = get_dataset(args.dataset, args.data_dir, False, fake_size=args.fake_size,
                              input_size=args.input_size)
    model = _build_model(args, info, weights)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _save_args(args, out)
    final = out / "model.kse"
    save(model.cpu(), final, preprocess=info.preprocess(), extra={"pretrained": weights})
    print(f"wrote {final} (torchvision {weights}, not trained further)")
    return 0


def _train(args: argparse.Namespace, device: torch.device, distributed: bool) -> int:
    from .train import TrainConfig, fit, is_main_process

    out = Path(args.out)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, schedule=args.schedule,
                      weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, seed=args.seed,
                      amp=args.amp, channels_last=args.channels_last, max_steps_per_epoch=args.max_steps)
    train_loader, test_loader, info = _loaders(args.dataset, args.data_dir, args.batch_size, args.workers,
                                               args.fake_size, args.input_size, args.seed)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    weights = _pretrained_weights(args.arch, args.weights)
    model = _build_model(args, info, weights).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = _wrap_ddp(model, device, args.sync_bn) if distributed else model
    out.mkdir(parents=True, exist_ok=True)
    _save_args(args, out)
    fit(net, train_loader, test_loader, cfg, out, device, resume=args.resume)
    if is_main_process():
        from . import serialization  # imported late: a long run picks up the current file format code

        final = out / "model.kse"
        trained = net.module if distributed else net
        serialization.save(_revert_sync_batchnorm(trained).cpu(), final, preprocess=info.preprocess(),
                           extra={"pretrained": weights} if weights else None)
        print(f"wrote {final}")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a baseline (from scratch or from torchvision weights)",
                       description="Train a baseline model; writes last.ckpt every epoch, metrics.jsonl and model.kse. "
                                   "With --weights (torchvision models), start from pretrained weights; with "
                                   "--weights and --epochs 0, only save them as OUT/model.kse.")
    _config_file(p)
    _common(p, "arch", "dataset", "data-dir", "out", "epochs", "lr", "batch-size", "device", "seed")
    p.add_argument("--weights", default=None, metavar="NAME",
                   help="torchvision pretrained weights to start from (DEFAULT, IMAGENET1K_V1, ...; none: random "
                        "initialisation, the default); read from torchvision's cache, downloaded there if missing")
    p.add_argument("--schedule", choices=["cosine", "multistep"], default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--workers", type=int, default=None, help="data-loader worker processes")
    p.add_argument("--amp", action="store_true", default=None, help="mixed precision: float16 with loss scaling on CUDA, bfloat16 on CPU")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--resume", action="store_true", default=None, help="continue from OUT/last.ckpt")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch")
    p.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (quick runs)")
    p.add_argument("--fake-size", type=int, default=None, help="FakeData train size")
    p.add_argument("--input-size", type=int, default=None, help="FakeData image size")
    p.set_defaults(func=cmd_train, _defaults=dict(
        arch="resnet56", dataset="fashion-mnist", out="runs/train", epochs=30, lr=0.1, batch_size=128,
        schedule="cosine", weight_decay=5e-4, warmup_epochs=0.0, workers=0, amp=False, channels_last=True,
        resume=False, sync_bn=False, seed=0, max_steps=None, fake_size=256, input_size=None))


# ----------------------------------------------------------------------------- shared helpers
def _checkpoint_path(args: argparse.Namespace) -> Path:
    """``--checkpoint``, checked to exist; a folder written by ``kse train`` means its model.kse."""
    if not getattr(args, "checkpoint", None):
        raise CLIError("--checkpoint is required: the .kse file to read (e.g. runs/train/model.kse)")
    path = Path(args.checkpoint)
    if path.is_dir() and (path / "model.kse").is_file():
        path = path / "model.kse"
    if not path.exists():
        raise CLIError(f"--checkpoint: file not found: {path}")
    if not path.is_file():
        raise CLIError(f"--checkpoint: {path} is a folder without a model.kse; pass the .kse file")
    return path


def _load_model(path: Path, flag: str = "--checkpoint") -> torch.nn.Module:
    """``kse.load`` with a hint when the file is a training-state checkpoint, not a model;
    errors name ``flag``, the option that gave the file."""
    from .serialization import CheckpointError, load

    try:
        return load(path)
    except CheckpointError as exc:
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                is_training_state = "kse_training_state" in (f.metadata() or {})
        except Exception:  # noqa: BLE001 - not even safetensors: keep the original message
            is_training_state = False
        if is_training_state:
            raise CLIError(f"{flag}: {path} is a training state (last.ckpt), not a model; "
                           f"pass the model.kse written next to it") from None
        raise CLIError(f"{flag}: {exc}") from None


def _input_size(model: torch.nn.Module, path: Path) -> tuple:
    pre = getattr(model, "kse_preprocess", None) or {}
    size = pre.get("input_size")
    if not size or len(size) != 3:
        raise CLIError(f"{path} records no input size (preprocess.input_size); re-save it with kse.save(..., "
                       "preprocess={'input_size': [C, H, W], ...})")
    return tuple(int(s) for s in size)


_KSE_FLAGS = {"G": "--G", "T": "--T", "alpha": "--alpha", "seed": "--seed", "include": "--include",
              "score": "--score", "entropy_layout": "--entropy-layout", "channel_multiple": "--channel-multiple",
              "exclude": "--exclude", "n_init": "--n-init", "input_size": "--checkpoint's input size"}


def _kse_config(args: argparse.Namespace, input_size: Optional[tuple] = None):
    """``KSEConfig`` from the shared flags; a bad value names its flag."""
    from .config import KSEConfig

    kwargs = dict(G=args.G, T=args.T, alpha=args.alpha)
    for key in ("seed", "include", "exclude", "score", "entropy_layout", "channel_multiple", "n_init"):
        if getattr(args, key, None) is not None:
            kwargs[key] = getattr(args, key)
    if input_size is not None:
        kwargs["input_size"] = input_size
    try:
        return KSEConfig(**kwargs)
    except (ValueError, TypeError) as exc:
        field = str(exc).split(" ", 1)[0]
        raise CLIError(f"{_KSE_FLAGS.get(field, 'KSE config')}: {exc}") from None


def _kse_layers(model: torch.nn.Module) -> Dict[str, Any]:
    from .conv import KSEConv2d

    return {n: m for n, m in model.named_modules() if isinstance(m, KSEConv2d)}


def _dataset_name(model: torch.nn.Module, args: argparse.Namespace, path: Path) -> str:
    from .data import dataset_info

    pre = getattr(model, "kse_preprocess", None) or {}
    name = getattr(args, "dataset", None) or pre.get("dataset")
    if not name:
        raise CLIError(f"{path} records no dataset; pass --dataset")
    dataset_info(name)  # unknown name -> one-line DatasetError
    return name


def _check_dataset_fits(model: torch.nn.Module, info, path: Path) -> None:
    pre = getattr(model, "kse_preprocess", None) or {}
    classes, size = pre.get("num_classes"), pre.get("input_size")
    if classes and info.num_classes and classes != info.num_classes:
        raise CLIError(f"dataset {info.name!r} has {info.num_classes} classes but the model in {path} "
                       f"predicts {classes}; use the dataset it was trained on ({pre.get('dataset')!r})")
    if size and size[0] != info.in_channels:
        raise CLIError(f"dataset {info.name!r} has {info.in_channels}-channel images but the model in {path} "
                       f"reads {size[0]} channels; use the dataset it was trained on ({pre.get('dataset')!r})")


def _fake_input_size(model: torch.nn.Module) -> Optional[int]:
    size = (getattr(model, "kse_preprocess", None) or {}).get("input_size")
    return int(size[1]) if size else None


def _test_loader(model: torch.nn.Module, args: argparse.Namespace, path: Path, batch_size: int = 256):
    from torch.utils.data import DataLoader

    from .data import get_dataset

    name = _dataset_name(model, args, path)
    ds, info = get_dataset(name, args.data_dir, False, fake_size=args.fake_size, input_size=_fake_input_size(model))
    _check_dataset_fits(model, info, path)
    return DataLoader(ds, batch_size, shuffle=False), info


def _stage(command: str, msg: str) -> None:
    print(f"kse {command}: {msg}", file=sys.stderr, flush=True)


def _training_extension(command: str, model: torch.nn.Module, device: torch.device, say: bool = True) -> None:
    """Load the compiled extension that builds W' in CPU training steps before the first one
    (building it on first use takes a while once per machine), with a note saying so."""
    if device.type != "cpu" or not _kse_layers(model):
        return
    from . import fused

    if say and not fused.loaded():
        _stage(command, "loading the compiled extension for CPU training steps (built on first use with a C++ "
                        "compiler, about 20 s once per machine)")
    if not fused.available() and say:
        _stage(command, f"note: no compiled extension ({fused.build_error()}); W' is built with stock operations")


def _set_threads(n: Optional[int]) -> None:
    if n is not None:
        _at_least("--threads", n, 1)
        torch.set_num_threads(n)


def _at_least(flag: str, value: Optional[int], low: int) -> None:
    if value is not None and value < low:
        raise CLIError(f"{flag} must be >= {low}, got {value}")


def _busy_note(command: str) -> None:
    from .report import busy_note

    note = busy_note()
    if note:
        _stage(command, f"note: {note}")


def _save_json(path: Path, data: Any) -> None:
    from .atomic import write_text

    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- models
def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models

    for name in list_models():
        print(name)
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the registered model names",
                       description="List every model name accepted by --arch (CIFAR ResNets, DenseNet-40, torchvision).")
    p.set_defaults(func=cmd_models, _defaults={})


# ----------------------------------------------------------------------------- analyze
def _analysis(model: torch.nn.Module, args: argparse.Namespace, path: Path) -> Dict[str, Any]:
    from .compress import plan
    from .report import kse_layer_summary, layer_summary, summary_totals

    input_size = _input_size(model, path)
    cfg = _kse_config(args, input_size)
    existing = kse_layer_summary(model)
    try:
        example = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
        rows = layer_summary(plan(model, cfg, example))
    except ValueError as exc:
        if not existing:
            raise CLIError(str(exc)) from None
        rows = []  # already compressed: report the KSE layers it has
    return {"checkpoint": str(path), "arch": model.kse_arch.get("name"), "config": cfg.to_dict(),
            "planned": rows, "planned_totals": summary_totals(rows) if rows else None,
            "compressed": existing, "compressed_totals": summary_totals(existing) if existing else None}


def _print_layer_table(rows, planned: bool) -> None:
    from .report import text_table

    def stat(v):
        return "-" if v is None else f"{v:.3f}"

    table = [[r["name"], r["in_channels"], r["out_channels"], r["kept"], r["centroids"], f"{r['ratio']:.2f}x",
              stat(r["indicator_min"]), stat(r["indicator_mean"]), stat(r["indicator_max"])] for r in rows]
    headers = ["layer", "C_in", "N", "kept", "centroids", "ratio", "v_min", "v_mean", "v_max"]
    if not planned:
        headers, table = headers[:6] + ["form"], [t[:6] + [r["form"]] for t, r in zip(table, rows)]
    print(text_table(headers, table))


def cmd_analyze(args: argparse.Namespace) -> int:
    from .report import plot_layers

    path = _checkpoint_path(args)
    _kse_config(args)  # a bad --G fails before the model is read
    model = _load_model(path)
    result = _analysis(model, args, path)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        _save_args(args, out)
        _save_json(out / "analysis.json", result)
        rows = result["planned"] or result["compressed"]
        plot_layers(rows, out / "analysis.png", G=args.G if result["planned"] else None,
                    title=f"{path.name}: KSE G={args.G} T={args.T} alpha={args.alpha}")
        result_files = [out / "analysis.json", out / "analysis.png", out / "args.json"]
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
            _print_layer_table(rows, planned)
            print(f"total: {totals['layers']} layers, input channels kept {totals['kept']}/{totals['in_channels']}, "
                  f"{totals['centroids']} centroids for {totals['kernels']} kernels ({totals['ratio']:.2f}x)\n")
        for f in result_files:
            print(f"wrote {f}")
    return 0


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="per-layer KSE plan of a checkpoint (indicator, channels kept, centroids)",
                       description="Score every eligible convolution of a checkpoint with the KSE indicator and show "
                                   "what KSE would keep (no data needed; the model is not changed). With --out, "
                                   "writes analysis.json and analysis.png there.")
    _config_file(p)
    _common(p, "checkpoint", "out", "G", "T", "alpha")
    p.add_argument("--include", nargs="+", default=None, metavar="PAT", help="glob patterns of layers to consider")
    p.add_argument("--exclude", nargs="+", default=None, metavar="PAT", help="glob patterns of layers to skip")
    p.add_argument("--json", action="store_true", default=None, help="print the analysis as one JSON object")
    p.set_defaults(func=cmd_analyze, _defaults=dict(G=4, T=0, alpha=1.0, json=False))


# ----------------------------------------------------------------------------- compress
def _compress_model(model: torch.nn.Module, args: argparse.Namespace, path: Path):
    """Compress in place; returns ``(plans, profile before, profile after)``."""
    from .compress import compress_
    from .profile import profile

    input_size = _input_size(model, path)
    cfg = _kse_config(args, input_size)
    before = profile(model, input_size)
    example = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(cfg.seed))
    try:
        plans = compress_(model, cfg, example_inputs=example)
    except ValueError as exc:
        hint = (" (the checkpoint is already KSE-compressed; compress its dense baseline instead)"
                if _kse_layers(model) else "")
        raise CLIError(f"{exc}{hint}") from None
    return plans, before, profile(model, input_size)


def _print_profiles(before, after, sizes: Optional[tuple] = None) -> None:
    from .report import fmt_bytes, fmt_count, fmt_ratio, text_table

    rows = [["params", fmt_count(before.params), fmt_count(after.params), fmt_ratio(before.params, after.params)],
            ["MACs", fmt_count(before.macs), fmt_count(after.macs), fmt_ratio(before.macs, after.macs)],
            ["fusion adds", fmt_count(before.fusion_adds), fmt_count(after.fusion_adds), ""],
            ["stored size", fmt_bytes(before.stored_bytes), fmt_bytes(after.stored_bytes),
             fmt_ratio(before.stored_bytes, after.stored_bytes)]]
    if sizes:
        rows.append(["file size", fmt_bytes(sizes[0]), fmt_bytes(sizes[1]), fmt_ratio(*sizes)])
    print(text_table(["", "before", "after", "ratio"], rows))


def _write_model(args: argparse.Namespace, model: torch.nn.Module, out: Path, extra: Optional[dict]) -> None:
    """Save ``model`` to ``out`` (keeping its preprocessing) and the resolved arguments beside it
    (``model.kse`` -> ``model.args.json``)."""
    from .serialization import save

    save(model, out, preprocess=getattr(model, "kse_preprocess", None), extra=extra)
    _save_args(args, out.parent, f"{out.stem}.args.json")


def _check_out(out: Path, folder: bool) -> None:
    """Fail before any work when ``--out`` cannot be written: it exists as the wrong kind, a
    folder on its way is a file, or the nearest existing folder is not writable."""
    if folder and out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a folder to write into")
    if not folder and out.is_dir():
        raise CLIError(f"--out {out} is a folder; give the .kse file to write (e.g. {out / 'model.kse'})")
    parent = out if folder else out.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise CLIError(f"--out {out}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise CLIError(f"--out {out}: cannot write into {p} (permission denied)")
            return


def _output_file(args: argparse.Namespace, path: Path, what: str) -> Path:
    """``--out`` as a file path that does not overwrite ``--checkpoint``."""
    if not args.out:
        raise CLIError(f"--out is required: {what}")
    out = Path(args.out)
    if out.resolve() == path.resolve():
        raise CLIError("--out must differ from --checkpoint (the baseline would be overwritten)")
    return out


def cmd_compress(args: argparse.Namespace) -> int:
    from .report import layer_summary

    path = _checkpoint_path(args)
    out = _output_file(args, path, "the compressed .kse file to write")
    _kse_config(args)
    model = _load_model(path)
    plans, before, after = _compress_model(model, args, path)
    extra = {**(getattr(model, "kse_extra", None) or {}),
             "compressed_from": str(path), "baseline": {"params": before.params, "macs": before.macs}}
    _write_model(args, model, out, extra)
    _print_layer_table(layer_summary(plans), planned=True)
    print()
    _print_profiles(before, after, (path.stat().st_size, out.stat().st_size))
    print(f"wrote {out}")
    return 0


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="compress a checkpoint with KSE",
                       description="Load a .kse checkpoint, compress it with KSE (KSE.md §1-5) and save the result; "
                                   "prints the per-layer plan and params / MACs before and after.")
    _config_file(p)
    _common(p, "checkpoint", "out", "G", "T", "alpha", "seed")
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
    p.set_defaults(func=cmd_compress, _defaults=dict(G=4, T=0, alpha=1.0, seed=0, score="kse",
                                                     entropy_layout="paper"))


# ----------------------------------------------------------------------------- prune-l1
def cmd_prune_l1(args: argparse.Namespace) -> int:
    from .filter_prune import l1_prune_, prune_to_macs
    from .profile import profile

    path = _checkpoint_path(args)
    out = _output_file(args, path, "the pruned .kse file to write")
    targets = [f for f, v in (("--ratio", args.ratio), ("--macs", args.macs), ("--match", args.match)) if v is not None]
    if len(targets) != 1:
        raise CLIError("give exactly one of --ratio (fraction of filters to remove), --macs (a MAC budget) or "
                       f"--match (a .kse file whose MACs to match); got {', '.join(targets) or 'none'}")
    model = _load_model(path)
    if _kse_layers(model):
        raise CLIError(f"{path} is KSE-compressed; L1 filter pruning starts from a dense baseline")
    input_size = _input_size(model, path)
    example = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    before = profile(model, input_size)
    try:
        if args.ratio is not None:
            removed = l1_prune_(model, args.ratio, args.layers, example)
            ratio = args.ratio
        else:
            target = args.macs
            if args.match is not None:
                other = Path(args.match)
                if not other.is_file():
                    raise CLIError(f"--match: file not found: {other}")
                matched = _load_model(other, "--match")
                target = profile(matched, _input_size(matched, other)).macs
            _stage("prune-l1", f"searching the pruning ratio for {target / 1e6:.2f}M MACs")
            model, ratio, removed = prune_to_macs(model, float(target), args.layers, example)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    after = profile(model, input_size)
    extra = {**(getattr(model, "kse_extra", None) or {}), "pruned_from": str(path),
             "l1_prune": {"ratio": ratio, "layers": list(args.layers), "removed": {k: len(v) for k, v in removed.items()},
                          "baseline": {"params": before.params, "macs": before.macs}}}
    _write_model(args, model, out, extra)
    print(f"L1 filter pruning, ratio {ratio:.4f} on {len(removed)} layers ({', '.join(args.layers)})")
    _print_profiles(before, after, (path.stat().st_size, out.stat().st_size))
    print(f"wrote {out}")
    return 0


def _add_prune_l1(sub) -> None:
    p = sub.add_parser("prune-l1", help="L1-norm filter pruning (Li et al. 2017), the peer KSE is compared to",
                       description="Remove the output filters of smallest L1 norm from the selected convolutions "
                                   "(default: the first conv of every residual block, as Li et al. do for ResNet-56), "
                                   "with Torch-Pruning's DependencyGraph; the same fraction in every layer, given or "
                                   "searched to meet a MAC budget. Writes a dense .kse file for `kse finetune`.")
    _config_file(p)
    _common(p, "checkpoint", "out")
    p.add_argument("--ratio", type=float, default=None, help="fraction of filters to remove in each layer, in [0, 1)")
    p.add_argument("--macs", type=float, default=None, help="MAC budget of the pruned model")
    p.add_argument("--match", default=None, metavar="KSE_FILE", help="match the MACs of this model (e.g. a KSE one)")
    p.add_argument("--layers", nargs="+", default=None, metavar="PAT", help="glob patterns of the convs to prune")
    p.set_defaults(func=cmd_prune_l1, _defaults=dict(layers=["*.conv1"]))


# ----------------------------------------------------------------------------- finetune
def _finetune_config(args: argparse.Namespace):
    from .train import TrainConfig

    # KSE.md §6: SGD momentum 0.9, weight decay 1e-5, lr 0.01, lr x0.1 at half the run (CIFAR-10);
    # ImageNet drops at epochs 7 and 14 of 21, hence --milestones (fractions of the run, as in TrainConfig)
    milestones = args.milestones if isinstance(args.milestones, (list, tuple)) else [args.milestones]  # YAML: 0.5
    official = bool(args.official_sgd)
    return TrainConfig(epochs=args.epochs, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                       batch_size=args.batch_size, schedule=args.schedule, milestones=milestones, gamma=0.1,
                       seed=args.seed, channels_last=args.channels_last, max_steps_per_epoch=args.max_steps,
                       amp=bool(args.amp), nesterov=not official, decay_norm_and_bias=official)


def cmd_finetune(args: argparse.Namespace) -> int:
    path = _checkpoint_path(args)
    if not args.out:
        raise CLIError("--out is required: the folder for last.ckpt, metrics.jsonl and model.kse")
    cfg = _finetune_config(args)
    device = _device(args.device)
    if _world_size() <= 1:
        return _finetune(args, path, cfg, device, distributed=False)
    device = _init_distributed(device)
    return _run_distributed(lambda: _finetune(args, path, cfg, device, distributed=True))


def _finetune(args: argparse.Namespace, path: Path, cfg, device: torch.device, distributed: bool) -> int:
    from .serialization import save
    from .train import fit, is_main_process

    model = _load_model(path)  # every rank loads the same file: identical KSE layers everywhere
    layers = _kse_layers(model)
    if not layers:
        _stage("finetune", f"note: {path} has no KSE layers; fine-tuning it as a dense model")
    for m in layers.values():
        m.set_form("train")  # a deployed layer caches its weight; training needs the centroids
    name = _dataset_name(model, args, path)
    train_loader, test_loader, info = _loaders(name, args.data_dir, cfg.batch_size, args.workers, args.fake_size,
                                               _fake_input_size(model), args.seed)
    _check_dataset_fits(model, info, path)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _save_args(args, out)
    model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = _wrap_ddp(model, device, False) if distributed else model
    if is_main_process():
        _stage("finetune", f"{len(layers)} KSE layers, {cfg.epochs} epochs on {name}, lr {cfg.lr}, "
                           f"{cfg.schedule}, device {device}")
    _training_extension("finetune", model, device, say=is_main_process())
    history = fit(net, train_loader, test_loader, cfg, out, device, resume=args.resume)
    if is_main_process():
        final = out / "model.kse"
        extra = {**(getattr(model, "kse_extra", None) or {}), "finetuned_from": str(path),
                 "finetune": {"epochs": cfg.epochs, "lr": cfg.lr, "milestones": cfg.milestones,
                              "max_steps_per_epoch": cfg.max_steps_per_epoch,
                              "test_top1": history[-1]["test_top1"] if history else None}}
        save(model.cpu().to(memory_format=torch.contiguous_format), final, preprocess=model.kse_preprocess,
             extra=extra)
        print(f"wrote {final}")
    return 0


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a compressed checkpoint",
                       epilog="Defaults: 20 epochs (the paper runs 200 on CIFAR-10), lr 0.01, batch 128, the dataset "
                              "recorded in the checkpoint.",
                       description="Fine-tune the centroids of a KSE-compressed model (assignments frozen) with the "
                                   "paper's recipe (KSE.md §6: SGD momentum 0.9, weight decay 1e-5, lr 0.01, x0.1 at "
                                   "half the run unless --milestones says otherwise); writes last.ckpt every epoch, "
                                   "metrics.jsonl and OUT/model.kse.")
    _config_file(p)
    _common(p, "checkpoint", "dataset", "data-dir", "out", "epochs", "lr", "batch-size", "device", "seed")
    p.add_argument("--schedule", choices=["cosine", "multistep"], default=None, help="default: multistep (paper)")
    p.add_argument("--milestones", type=float, nargs="+", default=None, metavar="FRAC",
                   help="multistep: lr x0.1 at these fractions of --epochs (default 0.5, the paper's CIFAR-10 "
                        "recipe; its ImageNet one, epochs 7 and 14 of 21: 0.3333333333 0.6666666666)")
    p.add_argument("--weight-decay", type=float, default=None, help="default 1e-5 (paper)")
    p.add_argument("--official-sgd", action="store_true", default=None,
                   help="the authors' optimizer: plain momentum and weight decay on every parameter (default: "
                        "Nesterov momentum, no decay on BatchNorm and bias parameters)")
    p.add_argument("--workers", type=int, default=None, help="data-loader worker processes")
    p.add_argument("--amp", action="store_true", default=None,
                   help="mixed precision: float16 with loss scaling on CUDA, bfloat16 on CPU")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--resume", action="store_true", default=None, help="continue from OUT/last.ckpt")
    p.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (quick runs)")
    p.add_argument("--fake-size", type=int, default=None, help="FakeData train size")
    p.set_defaults(func=cmd_finetune, _defaults=dict(
        epochs=20, lr=0.01, batch_size=128, schedule="multistep", milestones=[0.5], weight_decay=1e-5, workers=0,
        amp=False, channels_last=True, resume=False, seed=0, max_steps=None, fake_size=256, official_sgd=False))


# ----------------------------------------------------------------------------- eval
def _deploy_cpu(model: torch.nn.Module, input_size: tuple, batch_size=(1, 8), fused: bool = False,
                command: str = "deploy") -> Dict[str, str]:
    """Put the KSE layers in their fastest CPU forms, measured at batch 1 and 8 by default (a form
    per batch size where they differ), with ``fused`` the compiled kernel among them when it
    builds; ``{}`` for a dense model."""
    from .conv import INFERENCE_FORMS
    from .deploy import deploy_

    if not _kse_layers(model):
        return {}
    if fused:
        from . import fused as fused_mod

        _stage(command, "building the fused kernel (a C++ compiler, once per machine: about 15 s)")
        if not fused_mod.available():
            _stage(command, f"note: no fused kernel ({fused_mod.build_error()}); using the stock forms")
            fused = False
    return deploy_(model.cpu(), form="auto", input_size=input_size, batch_size=batch_size,
                   candidates=INFERENCE_FORMS + (("fused",) if fused else ()))


def _form_counts(forms: Dict[str, str]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for f in forms.values():
        counts[f] = counts.get(f, 0) + 1
    return counts


def cmd_eval(args: argparse.Namespace) -> int:
    from .profile import profile
    from .report import fmt_bytes, fmt_count, measure_latency
    from .train import evaluate

    path = _checkpoint_path(args)
    _set_threads(args.threads)
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--max-batches", args.max_batches, 1),
                             ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0)):
        _at_least(flag, value, low)
    device = _device(args.device)
    model = _load_model(path)
    input_size = _input_size(model, path)
    loader, info = _test_loader(model, args, path, args.batch_size)
    _busy_note("eval")
    _stage("eval", f"deploying and timing on CPU ({torch.get_num_threads()} threads)")
    forms = _deploy_cpu(model, input_size)
    prof = profile(model, input_size)
    latency = measure_latency(model, input_size, 1, args.warmup, args.repeats)
    _stage("eval", f"evaluating on the {info.name} test split ({device})")
    metrics = evaluate(model.to(device), loader, device, max_batches=args.max_batches)
    result = {
        "checkpoint": str(path), "arch": model.kse_arch.get("name"), "dataset": info.name,
        "top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"], "count": metrics["count"],
        "params": prof.params, "macs": prof.macs, "fusion_adds": prof.fusion_adds, "stored_bytes": prof.stored_bytes,
        "file_bytes": path.stat().st_size, "latency_ms": latency["median_ms"], "latency_min_ms": latency["min_ms"],
        "latency_batch_size": 1, "latency_repeats": latency["repeats"], "threads": torch.get_num_threads(),
        "kse_layers": len(forms), "forms": _form_counts(forms),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    forms_text = ", ".join(f"{n} {f}" for f, n in sorted(result["forms"].items())) or "none"
    print(f"checkpoint  {path} ({result['arch']}, {len(forms)} KSE layers: {forms_text})")
    print(f"dataset     {info.name} test split, {metrics['count']} images")
    print(f"top-1       {metrics['top1']:.2f}%   top-5 {metrics['top5']:.2f}%   loss {metrics['loss']:.4f}")
    print(f"params      {fmt_count(prof.params)}   MACs {fmt_count(prof.macs)} (+{fmt_count(prof.fusion_adds)} "
          f"fusion adds)")
    print(f"file size   {fmt_bytes(result['file_bytes'])}   (stored tensors {fmt_bytes(prof.stored_bytes)})")
    print(f"latency     {latency['median_ms']:.3f} ms/image (CPU, batch 1, {result['threads']} threads, median of "
          f"{latency['repeats']} runs)")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy, size, MACs and CPU latency of a checkpoint",
                       description="Top-1 / top-5 on the test split of the checkpoint's dataset, params, MACs, file "
                                   "size and CPU latency (ms per image at batch 1, median after warm-up; KSE layers "
                                   "deployed first with kse.deploy_(form='auto')).")
    _config_file(p)
    _common(p, "checkpoint", "dataset", "data-dir", "batch-size", "device")
    p.add_argument("--json", action="store_true", default=None, help="print one JSON object")
    p.add_argument("--max-batches", type=int, default=None, help="evaluate only this many test batches")
    p.add_argument("--repeats", type=int, default=None, help="timed runs for the latency (default 50)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--fake-size", type=int, default=None, help="FakeData size (the test split is a quarter)")
    p.set_defaults(func=cmd_eval, _defaults=dict(batch_size=256, json=False, repeats=50, warmup=5, fake_size=256))


# ----------------------------------------------------------------------------- export
def _max_rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _export_and_check(model: torch.nn.Module, fmt: str, target: Path, example: torch.Tensor, check: torch.Tensor,
                      ref: torch.Tensor) -> float:
    """Export ``model`` to ``target`` in ``fmt``, run the file on ``check``; max relative difference to ``ref``."""
    import warnings

    try:
        with warnings.catch_warnings(), torch.no_grad():  # inference: no backward graph is recorded
            warnings.simplefilter("ignore")
            if fmt == "onnx":
                import onnxruntime as ort

                # NOTE: the TorchScript-based exporter (dynamo=False): the dynamo one needs onnxscript
                torch.onnx.export(model, (example,), str(target), dynamo=False, input_names=["input"],
                                  output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
                session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
                got = torch.from_numpy(session.run(None, {"input": check.numpy()})[0])
            else:
                torch.jit.trace(model, example).save(str(target))
                with torch.no_grad():
                    got = torch.jit.load(str(target))(check)
    except Exception as exc:  # noqa: BLE001 - reported as one line
        name = "ONNX" if fmt == "onnx" else "TorchScript"
        raise CLIError(f"{name} export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from None
    return _max_rel_diff(got, ref) if got.shape == ref.shape else float("inf")


def cmd_export(args: argparse.Namespace) -> int:
    from .atomic import atomic_path
    from .conv import without_fused

    path = _checkpoint_path(args)
    if not args.out:
        raise CLIError("--out is required: the folder to write model.onnx / model.ts.pt into")
    formats = list(dict.fromkeys(args.format))
    if "onnx" in formats:
        try:
            import onnxruntime  # noqa: F401 - checked before any work
        except ImportError:
            raise CLIError("ONNX export is verified with onnxruntime, which is not installed; "
                           "pip install 'kse[export]' or pass --format torchscript") from None
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    model = _load_model(path)
    input_size = _input_size(model, path)
    layers = _kse_layers(model)
    forms: Dict[str, str] = {}
    if layers:
        from .deploy import deploy_

        forms = deploy_(model, form=args.form, input_size=input_size) if args.form != "auto" else \
            _deploy_cpu(model, input_size, (args.batch_size,), fused=True, command="export")
    model.eval()
    exported, folded = model, False
    if args.fold:
        from .fold import fold_batchnorm

        try:  # the check below compares the folded model's files with the unfolded model's outputs
            exported, folded = fold_batchnorm(model), True
            layers = _kse_layers(exported)
        except ValueError as exc:
            _stage("export", f"note: BatchNorm not folded ({exc})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _save_args(args, out)
    gen = torch.Generator().manual_seed(0)
    # the trace runs at --batch-size: TorchScript keeps the forms chosen for it
    example = torch.randn(args.batch_size, *input_size, generator=gen)
    check = torch.randn(args.batch_size + 2, *input_size, generator=gen)  # the batch axis must stay dynamic
    with torch.no_grad():
        ref = model(check)
    written, verified, forms_of = [], {}, {}
    tolerance = 1e-4
    for fmt in formats:
        target = out / ("model.onnx" if fmt == "onnx" else "model.ts.pt")
        # onnxruntime cannot run the compiled kernel, and runs the channel gather of "dense" slowly
        # (forms measured in PyTorch say nothing of it): ONNX gets zero kernels for the dropped
        # channels ("full") under auto, and where an explicit form is fused
        fmt_forms = forms if fmt != "onnx" else {
            n: "full" if args.form == "auto" else without_fused(f, "full") for n, f in forms.items()}
        for n, f in fmt_forms.items():
            layers[n].set_form(f)
        # written to a temporary file, checked, then renamed: a failed export leaves no file behind
        with atomic_path(target) as tmp:
            diff = _export_and_check(exported, fmt, tmp, example, check, ref)
            if not diff <= tolerance:
                raise CLIError(f"{fmt} export does not match PyTorch: max relative difference {diff:.3g} > "
                               f"{tolerance:g} (nothing written)")
        forms_of[fmt] = _form_counts({n: m._form_for_batch(args.batch_size) for n, m in layers.items()})
        verified[fmt] = {"file": str(target), "max_rel_diff": diff, "forms": forms_of[fmt]}
        written.append(target)
        print(f"wrote {target} (verified: max relative difference {diff:.2e} on a batch of {len(check)})")
    manifest = {"checkpoint": str(path), "arch": model.kse_arch.get("name"), "input_size": list(input_size),
                "preprocess": model.kse_preprocess, "forms": _form_counts(forms), "tolerance": tolerance,
                "batch_size": args.batch_size, "batchnorm_folded": folded, "exports": verified,
                "input_name": "input", "output_name": "logits"}
    if "fused" in forms_of.get("torchscript", {}):
        manifest["torchscript_needs"] = ("the kse operator library: `import kse.fused; kse.fused.available()` "
                                         "before torch.jit.load (or torch.ops.load_library(kse.fused.library_path()))")
        print("note: model.ts.pt calls the fused KSE kernel (torch.ops.kse.fused_conv): in Python, "
              "`import kse.fused; kse.fused.available()` before torch.jit.load")
    _save_json(out / "export.json", manifest)
    print(f"wrote {out / 'export.json'}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX and TorchScript (verified)",
                       description="Deploy the KSE layers and export the model to ONNX (checked with onnxruntime on "
                                   "CPU) and TorchScript (torch.jit.trace, reloaded and checked); outputs must match "
                                   "PyTorch within 1e-4 relative. Writes OUT/model.onnx, OUT/model.ts.pt, "
                                   "OUT/export.json. The batch axis is dynamic.")
    _config_file(p)
    _common(p, "checkpoint", "out")
    p.add_argument("--format", nargs="+", choices=["onnx", "torchscript"], default=None,
                   help="formats to write (default: both)")
    p.add_argument("--form", choices=["auto", "dense", "full", "split", "fused"], default=None,
                   help="KSE layer form to export (default auto: for TorchScript the fastest per layer at "
                        "--batch-size on this CPU, the compiled fused kernel among them when it builds; for "
                        "ONNX full, zero kernels for dropped channels: onnxruntime cannot run the kernel, and "
                        "runs the gather of 'dense' slowly, 0.33x at batch 64 on ResNet-56 here). An explicit "
                        "form applies to both, except that ONNX gets full where it says fused")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size the forms are chosen for and the TorchScript trace runs at (default 1); "
                        "the exported batch axis stays dynamic")
    p.add_argument("--no-fold", dest="fold", action="store_false", default=None,
                   help="keep BatchNorm layers (default: fold each into the convolution before it, and a ReLU "
                        "after it into a KSE layer, with kse.fold_batchnorm)")
    p.set_defaults(func=cmd_export, _defaults=dict(format=["onnx", "torchscript"], form="auto", batch_size=1,
                                                   fold=True))


# ----------------------------------------------------------------------------- bench
def _bench(model: torch.nn.Module, input_size: tuple, batch_sizes: List[int], warmup: int,
           repeats: int, use_fused: bool = False) -> List[Dict[str, Any]]:
    from . import fused
    from .conv import INFERENCE_FORMS
    from .deploy import deploy_
    from .report import capture_layer_inputs, dense_equivalent, measure_latency, time_call

    if use_fused and not fused.available():
        raise CLIError(f"--fused: the fused kernel could not be built ({fused.build_error()})")
    layers = _kse_layers(model)
    baseline = dense_equivalent(model).eval()
    assert not _kse_layers(baseline), "dense_equivalent left a KSE layer"
    results = []
    for b in batch_sizes:
        _stage("bench", f"batch {b}: timing {len(layers)} KSE layers")
        x = torch.randn(b, *input_size, generator=torch.Generator().manual_seed(b))
        for m in layers.values():
            m.set_form("dense")
        inputs = capture_layer_inputs(model, list(layers), x)
        rows = []
        for name, m in layers.items():
            conv = m.to_conv().eval()
            t_conv = time_call(conv, inputs[name], warmup, repeats)["median_ms"]
            m.set_form("dense")
            t_dense = time_call(m, inputs[name], warmup, repeats)["median_ms"]
            m.set_form("split")
            t_split = time_call(m, inputs[name], warmup, repeats)["median_ms"]
            times = {"dense": t_dense, "split": t_split}
            if use_fused and fused.supports(m):
                m.set_form("fused")
                times["fused"] = time_call(m, inputs[name], warmup, repeats)["median_ms"]
            rows.append({"name": name, "in_channels": m.in_channels, "out_channels": m.out_channels,
                         "kept": len(m.kept_channels), "centroids": len(m.centroids), "conv_ms": t_conv,
                         "dense_ms": t_dense, "split_ms": t_split, "fused_ms": times.get("fused"),
                         "dense_speedup": t_conv / t_dense, "split_speedup": t_conv / t_split,
                         "best": min(times, key=times.get)})
        _stage("bench", f"batch {b}: timing the whole model")
        forms = deploy_(model, form="auto", input_size=input_size, batch_size=b,
                        candidates=INFERENCE_FORMS + (("fused",) if use_fused else ()))
        dense_t = measure_latency(baseline, input_size, b, warmup, repeats)
        kse_t = measure_latency(model, input_size, b, warmup, repeats)
        results.append({"batch_size": b, "layers": rows, "model": {
            "dense_ms": dense_t["median_ms"], "kse_ms": kse_t["median_ms"],
            "speedup": dense_t["median_ms"] / kse_t["median_ms"], "forms": _form_counts(forms)}})
    return results


def cmd_bench(args: argparse.Namespace) -> int:
    from .report import text_table

    path = _checkpoint_path(args)
    _set_threads(args.threads)
    for b in args.batch_size:
        _at_least("--batch-size", b, 1)
    _at_least("--repeats", args.repeats, 1)
    _at_least("--warmup", args.warmup, 0)
    model = _load_model(path)
    if not _kse_layers(model):
        raise CLIError(f"{path} has no KSE layers; compress it first with `kse compress`")
    input_size = _input_size(model, path)
    _busy_note("bench")
    results = _bench(model, input_size, list(dict.fromkeys(args.batch_size)), args.warmup, args.repeats,
                     args.fused)
    report = {"checkpoint": str(path), "arch": model.kse_arch.get("name"), "input_size": list(input_size),
              "threads": torch.get_num_threads(), "repeats": args.repeats, "results": results}
    if args.json:
        print(json.dumps(report))
        return 0
    for res in results:
        print(f"batch {res['batch_size']} (CPU, {report['threads']} threads, median of {args.repeats} runs, ms):")
        fused_col = ["fused"] if args.fused else []
        print(text_table(["layer", "C_in", "N", "kept", "centroids", "conv", "dense", "split", *fused_col,
                          "conv/dense", "conv/split", "best"],
                         [[r["name"], r["in_channels"], r["out_channels"], r["kept"], r["centroids"],
                           f"{r['conv_ms']:.3f}", f"{r['dense_ms']:.3f}", f"{r['split_ms']:.3f}",
                           *([f"{r['fused_ms']:.3f}" if r["fused_ms"] is not None else "-"] if args.fused else []),
                           f"{r['dense_speedup']:.2f}x", f"{r['split_speedup']:.2f}x", r["best"]]
                          for r in res["layers"]]))
        mod = res["model"]
        print(f"whole model: dense baseline {mod['dense_ms']:.3f} ms, KSE deployed {mod['kse_ms']:.3f} ms "
              f"({mod['speedup']:.2f}x; forms {mod['forms']})\n")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="CPU latency of each KSE layer (dense / split / plain conv) and the model",
                       description="Time every KSE layer in its dense and split forms against the same layer as an "
                                   "equivalent nn.Conv2d (layer.to_conv()), and the whole model deployed against "
                                   "its dense equivalent (every KSE layer replaced by to_conv()). CPU, median of "
                                   "repeated runs after warm-up.")
    _config_file(p)
    _common(p, "checkpoint")
    p.add_argument("--batch-size", type=int, nargs="+", default=None, help="batch sizes to time (default: 1 64)")
    p.add_argument("--json", action="store_true", default=None, help="print one JSON object")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--fused", action="store_true", default=None,
                   help="also time the compiled fused kernel (kse.fused; built on first use, needs a C++ compiler)")
    p.set_defaults(func=cmd_bench, _defaults=dict(batch_size=[1, 64], json=False, repeats=20, warmup=3, fused=False))


# ----------------------------------------------------------------------------- deploy
def cmd_deploy(args: argparse.Namespace) -> int:
    from . import fused
    from .conv import INFERENCE_FORMS
    from .deploy import deploy_
    from .report import text_table

    path = _checkpoint_path(args)
    out = _output_file(args, path, "the deployed .kse file to write")
    _set_threads(args.threads)
    for b in args.batch_size:
        _at_least("--batch-size", b, 1)
    _at_least("--repeats", args.repeats, 1)
    if args.fused and not fused.available():
        raise CLIError(f"--fused: the fused kernel could not be built ({fused.build_error()}); drop --fused")
    model = _load_model(path)
    layers = _kse_layers(model)
    if not layers:
        raise CLIError(f"{path} has no KSE layers; compress it first with `kse compress`")
    input_size = _input_size(model, path)
    sizes = sorted(set(args.batch_size))
    _busy_note("deploy")
    _stage("deploy", f"timing every form of {len(layers)} KSE layers at batch {', '.join(map(str, sizes))} "
                     f"(CPU, {torch.get_num_threads()} threads)")
    forms = deploy_(model, form="auto", input_size=input_size, batch_size=sizes, repeats=args.repeats,
                    candidates=INFERENCE_FORMS + (("fused",) if args.fused else ()))
    _write_model(args, model, out, getattr(model, "kse_extra", None))
    print(text_table(["layer", "form"], [[n, f] for n, f in forms.items()]))
    print(f"forms: {', '.join(f'{f} x{c}' for f, c in _form_counts(forms).items())}")
    print(f"wrote {out} (loading it keeps these forms; nothing is measured again)")
    return 0


def _add_deploy(sub) -> None:
    p = sub.add_parser("deploy", help="choose each KSE layer's fastest CPU form by measuring, and save it",
                       description="Time every KSE layer in each inference form (dense over the kept channels, "
                                   "full, split, and with --fused the compiled kernel) at each --batch-size, give "
                                   "each layer the fastest form at each size (a form per batch size, such as "
                                   "fused@1,full@64, where they differ) and write a .kse file that keeps them.")
    _config_file(p)
    _common(p, "checkpoint", "out")
    p.add_argument("--batch-size", type=int, nargs="+", default=None,
                   help="batch sizes to measure at (default: 1 64); inputs run in the form of the nearest one")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per form and size (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--fused", action="store_true", default=None,
                   help="also consider the compiled fused kernel (kse.fused; built on first use, needs a C++ compiler)")
    p.set_defaults(func=cmd_deploy, _defaults=dict(batch_size=[1, 64], repeats=5, fused=False))


# ----------------------------------------------------------------------------- demo
DEMO_HOWTO = ("make it with `kse train --arch resnet56 --dataset fashion-mnist --out checkpoints/resnet56-fmnist` "
              "and copy checkpoints/resnet56-fmnist/model.kse to checkpoints/resnet56-fmnist.kse, or pass --checkpoint")


def _demo_checkpoint_candidates() -> List[Path]:
    """Where ``kse demo`` looks for its baseline: the repository's checkpoints/, then the current folder's."""
    import kse

    found: List[Path] = []
    for base in (Path(kse.__file__).resolve().parents[2], Path.cwd()):
        for rel in ("checkpoints/resnet56-fmnist.kse", "checkpoints/resnet56-fmnist/model.kse"):
            if base / rel not in found:
                found.append(base / rel)
    return found


class _Stages:
    """Numbered progress lines on stderr, with the time each stage took."""

    def __init__(self, total: int) -> None:
        import time

        self.total, self.index, self.clock = total, 0, time.perf_counter
        self.start = self.t0 = self.clock()
        self.seconds: Dict[str, float] = {}
        self.current: Optional[str] = None

    def __call__(self, key: str, msg: str) -> None:
        self.close()
        self.index += 1
        self.current, self.t0 = key, self.clock()
        _stage("demo", f"[{self.index}/{self.total}] {msg}")

    def close(self) -> None:
        if self.current is not None:
            self.seconds[self.current] = round(self.clock() - self.t0, 2)
            self.current = None


def _demo_finetune(model, train_loader, args, device) -> Dict[str, Any]:
    import math

    from .train import TrainConfig, build_optimizer, train_one_epoch

    per_epoch = len(train_loader)
    if per_epoch == 0:
        raise CLIError("the training split is smaller than one batch; lower --batch-size")
    epochs = max(1, math.ceil(args.finetune_steps / per_epoch))
    steps = math.ceil(args.finetune_steps / epochs)
    cfg = TrainConfig(epochs=epochs, lr=args.lr, momentum=0.9, weight_decay=1e-5, batch_size=args.batch_size,
                      schedule="multistep", milestones=[0.5], gamma=0.1, seed=args.seed, channels_last=False,
                      max_steps_per_epoch=steps)
    optimizer = build_optimizer(model, cfg)
    _training_extension("demo", model, device)
    rows = []
    for epoch in range(epochs):
        torch.manual_seed(args.seed * 1000 + epoch)
        rows.append(train_one_epoch(model, train_loader, optimizer, cfg, epoch, device))
    return {"steps": epochs * min(steps, per_epoch), "epochs": epochs, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
            "batch_size": cfg.batch_size, "schedule": "multistep, x0.1 at half", "train_loss": rows[-1]["train_loss"]}


def cmd_demo(args: argparse.Namespace) -> int:
    import copy

    from .report import fmt_bytes, fmt_count, fmt_ratio, layer_summary, markdown_table, plot_layers, \
        summary_totals, text_table
    from .serialization import save
    from .timing import time_interleaved
    from .train import evaluate

    if args.checkpoint:
        path = _checkpoint_path(args)
    else:
        candidates = _demo_checkpoint_candidates()
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise CLIError(f"no baseline checkpoint at {candidates[0]}; {DEMO_HOWTO}")
    for flag, value, low in (("--finetune-steps", args.finetune_steps, 0), ("--repeats", args.repeats, 1),
                             ("--batch-size", args.batch_size, 1), ("--eval-batches", args.eval_batches, 1)):
        _at_least(flag, value, low)
    if not args.lr > 0:
        raise CLIError(f"--lr must be a positive number, got {args.lr}")
    _kse_config(args)
    _set_threads(args.threads)
    device = _device(args.device)
    out = Path(args.out)
    stage = _Stages(7)

    baseline = _load_model(path)  # a bad file fails before any progress line
    input_size = _input_size(baseline, path)
    name = _dataset_name(baseline, args, path)
    _busy_note("demo")  # before any work of ours: the load average would count the demo itself
    stage("load", f"loaded the baseline {path} ({baseline.kse_arch.get('name')}); loading {name}")
    train_loader, test_loader, info = _loaders(name, args.data_dir, args.batch_size, 0, args.fake_size,
                                               _fake_input_size(baseline), args.seed)
    _check_dataset_fits(baseline, info, path)
    out.mkdir(parents=True, exist_ok=True)
    _save_args(args, out)

    stage("eval_baseline", f"evaluating the baseline on the {name} test split ({device})")
    acc_base = evaluate(baseline.to(device), test_loader, device, max_batches=args.eval_batches)
    baseline.cpu()
    _stage("demo", f"      baseline top-1 {acc_base['top1']:.2f}% on {acc_base['count']} images")

    stage("compress", f"compressing with KSE G={args.G} T={args.T} alpha={args.alpha}")
    model = copy.deepcopy(baseline)
    plans, prof_base, prof_kse = _compress_model(model, args, path)
    _stage("demo", f"      {len(plans)} layers; params {fmt_count(prof_base.params)} -> {fmt_count(prof_kse.params)}, "
                   f"MACs {fmt_count(prof_base.macs)} -> {fmt_count(prof_kse.macs)}")

    stage("eval_compressed", "evaluating the compressed model before fine-tuning")
    acc_compressed = evaluate(model.to(device), test_loader, device, max_batches=args.eval_batches)
    _stage("demo", f"      top-1 {acc_compressed['top1']:.2f}% before fine-tuning")

    stage("finetune", f"fine-tuning the centroids for {args.finetune_steps} steps (batch {args.batch_size}, "
                      f"lr {args.lr}, {device})")
    finetune = _demo_finetune(model, train_loader, args, device) if args.finetune_steps else {"steps": 0}

    stage("deploy", "deploying the KSE layers (fastest form per layer and batch size on this CPU) and evaluating")
    model.cpu().eval()
    forms = _deploy_cpu(model, input_size, (1, 64), fused=args.fused)
    acc_kse = evaluate(model.to(device), test_loader, device, max_batches=args.eval_batches)
    model.cpu()
    _stage("demo", f"      top-1 {acc_kse['top1']:.2f}% after fine-tuning ({_form_counts(forms)})")
    model_file = out / "model.kse"
    save(model, model_file, extra={**(getattr(baseline, "kse_extra", None) or {}), "compressed_from": str(path),
                                   "demo_finetune": finetune})

    stage("latency", f"timing on CPU, batch 1 and 64 ({torch.get_num_threads()} threads, best of 10 "
                     f"interleaved rounds of {max(args.repeats // 10, 1)} runs)")
    latency, forms_by_batch = {}, {}
    layers = _kse_layers(model)
    timed = {"baseline": baseline.eval(), "kse": model.eval()}
    try:  # both also as deployed for inference: BatchNorm folded into the convolutions
        from .fold import fold_batchnorm

        timed.update(baseline_folded=fold_batchnorm(baseline), kse_folded=fold_batchnorm(model))
        # and the folded baseline in channels_last, the layout where oneDNN runs it fastest (it
        # takes 1.4x-1.8x less time than NCHW at batch 1 on this project's CPU): the fair baseline
        cl = fold_batchnorm(copy.deepcopy(baseline).to(memory_format=torch.channels_last))
        timed["baseline_folded_cl"] = lambda x, m=cl: m(x.contiguous(memory_format=torch.channels_last))
    except ValueError as exc:
        _stage("demo", f"      note: BatchNorm not folded ({exc})")
    for b in (1, 64):
        forms_by_batch[b] = _form_counts({n: m._form_for_batch(b) for n, m in layers.items()})
        x = torch.randn(b, *input_size, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            times = time_interleaved(list(timed.values()), x, rounds=10, repeats=max(args.repeats // 10, 1))
        latency[b] = dict(zip(timed, times))
    stage.close()

    rows = layer_summary(plans)
    plot = plot_layers(rows, out / "layers.png", G=args.G,
                       title=f"{baseline.kse_arch.get('name')} on {name}: KSE G={args.G} T={args.T}")
    sizes = (path.stat().st_size, model_file.stat().st_size)
    table = [
        ["top-1 (%)", f"{acc_base['top1']:.2f}", f"{acc_kse['top1']:.2f}",
         f"{acc_kse['top1'] - acc_base['top1']:+.2f} pt"],
        ["top-1 before fine-tune (%)", "", f"{acc_compressed['top1']:.2f}",
         f"{acc_compressed['top1'] - acc_base['top1']:+.2f} pt"],
        ["top-5 (%)", f"{acc_base['top5']:.2f}", f"{acc_kse['top5']:.2f}", f"{acc_kse['top5'] - acc_base['top5']:+.2f} pt"],
        ["params", fmt_count(prof_base.params), fmt_count(prof_kse.params), fmt_ratio(prof_base.params, prof_kse.params)],
        ["MACs", fmt_count(prof_base.macs), fmt_count(prof_kse.macs), fmt_ratio(prof_base.macs, prof_kse.macs)],
        ["file size", fmt_bytes(sizes[0]), fmt_bytes(sizes[1]), fmt_ratio(*sizes)],
    ]
    for suffix, label, kse_key in (("", "", "kse"), ("_folded", ", BatchNorm folded", "kse_folded"),
                                   ("_folded_cl", ", folded, baseline channels_last", "kse_folded")):
        for b in (1, 64) if "baseline" + suffix in timed else ():
            base_ms, kse_ms = latency[b]["baseline" + suffix]["median_ms"], latency[b][kse_key]["median_ms"]
            table.append([f"CPU latency, batch {b}{label} (ms)", f"{base_ms:.2f}", f"{kse_ms:.2f}",
                          fmt_ratio(base_ms, kse_ms)])
    headers = ["", "baseline", f"KSE G={args.G}", "ratio / change"]
    report = {
        "checkpoint": str(path), "arch": baseline.kse_arch.get("name"), "dataset": name,
        "kse_config": model.kse_config, "test_images": acc_base["count"],
        "baseline": {"top1": acc_base["top1"], "top5": acc_base["top5"], "params": prof_base.params,
                     "macs": prof_base.macs, "file_bytes": sizes[0],
                     "latency_ms": {str(b): latency[b]["baseline"]["median_ms"] for b in latency},
                     "latency_folded_ms": {str(b): latency[b]["baseline_folded"]["median_ms"]
                                           for b in latency if "baseline_folded" in latency[b]},
                     "latency_folded_channels_last_ms": {str(b): latency[b]["baseline_folded_cl"]["median_ms"]
                                                         for b in latency if "baseline_folded_cl" in latency[b]}},
        "compressed": {"top1": acc_kse["top1"], "top5": acc_kse["top5"], "top1_before_finetune": acc_compressed["top1"],
                       "top5_before_finetune": acc_compressed["top5"], "params": prof_kse.params,
                       "macs": prof_kse.macs, "fusion_adds": prof_kse.fusion_adds, "file_bytes": sizes[1],
                       "latency_ms": {str(b): latency[b]["kse"]["median_ms"] for b in latency},
                       "latency_folded_ms": {str(b): latency[b]["kse_folded"]["median_ms"]
                                             for b in latency if "kse_folded" in latency[b]},
                       "forms": _form_counts(forms), "forms_by_batch": {str(b): f for b, f in forms_by_batch.items()}},
        "finetune": finetune, "threads": torch.get_num_threads(), "latency_repeats": args.repeats,
        "layers": [{k: v for k, v in r.items() if k != "indicator"} for r in rows], "totals": summary_totals(rows),
        "stage_seconds": stage.seconds, "files": {"model": str(model_file), "plot": str(plot)},
    }
    _save_json(out / "report.json", report)
    from .atomic import write_text

    total_s = sum(stage.seconds.values())
    write_text(out / "report.md", "\n".join([
        f"# KSE demo: {report['arch']} on {name}", "",
        f"Baseline `{path}`, compressed with KSE G={args.G}, T={args.T}, alpha={args.alpha}, fine-tuned for "
        f"{finetune['steps']} steps (lr {args.lr}). Accuracy on {acc_base['count']} test images; latency on CPU "
        f"({report['threads']} threads, best of 10 interleaved rounds of {max(args.repeats // 10, 1)} runs; KSE layer "
        f"forms chosen by measurement for each batch size: " + ", ".join(f"batch {b}: {f}" for b, f in forms_by_batch.items()) + ").", "",
        markdown_table(headers, table), "",
        f"MACs follow the paper's deployment accounting (KSE.md §7): the centroid convolutions; the channel-fusion "
        f"additions ({fmt_count(prof_kse.fusion_adds)}) are not included. Latency is measured on the forms "
        f"that ran fastest here (`fused`: this package's compiled kernel), so it need not shrink as much as the "
        f"MACs. \"BatchNorm folded\": both models as deployed for inference (`kse.fold_batchnorm`, what "
        f"`kse export` does), each BatchNorm folded into the convolution before it.", "",
        f"{report['totals']['layers']} layers compressed: input channels kept {report['totals']['kept']}/"
        f"{report['totals']['in_channels']}, {report['totals']['centroids']} centroids for "
        f"{report['totals']['kernels']} kernels ({report['totals']['ratio']:.2f}x).", "",
        "![per-layer channels kept and centroids, indicator histogram](layers.png)", "",
        "Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stage.seconds.items()) + f"; total {total_s:.0f}.",
        ""]))
    print(text_table(headers, table))
    print()
    for f in (model_file, out / "report.json", out / "report.md", plot):
        print(f"wrote {f}")
    _stage("demo", f"done in {total_s:.0f}s")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="baseline -> KSE -> fine-tune -> deploy, with a before/after report",
                       description="End-to-end KSE on a trained checkpoint (default: checkpoints/resnet56-fmnist.kse): "
                                   "evaluate it on its dataset's test split, compress with KSE G=4, evaluate, "
                                   "fine-tune briefly, deploy, and report top-1, params, MACs, file size and CPU "
                                   "latency (batch 1 and 64) before and after. Writes report.json, report.md, "
                                   "model.kse and layers.png to --out. No network needed.")
    _config_file(p)
    _common(p, "checkpoint", "dataset", "data-dir", "out", "G", "T", "alpha", "lr", "batch-size", "device", "seed")
    p.add_argument("--finetune-steps", type=int, default=None, help="fine-tuning steps (default 300; 0 skips)")
    p.add_argument("--eval-batches", type=int, default=None, help="evaluate only this many test batches of 256")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per latency, spread over 10 interleaved rounds (default 40)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--fake-size", type=int, default=None, help="FakeData train size (for a fake checkpoint)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="consider the compiled fused kernel when deploying (default: on; built once, needs a C++ "
                        "compiler; without one the stock forms are used)")
    p.set_defaults(func=cmd_demo, _defaults=dict(
        out="runs/demo", G=4, T=0, alpha=1.0, lr=0.01, batch_size=128, seed=0, finetune_steps=300,
        repeats=40, fake_size=256, fused=True))


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kse", description="KSE: compress CNNs with kernel sparsity and entropy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    for add in (_add_models, _add_analyze, _add_compress, _add_prune_l1, _add_finetune, _add_eval, _add_export, _add_bench, _add_deploy,
                _add_demo):
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        sub = parser._subparsers._group_actions[0].choices[args.command]  # the subcommand's parser
        _resolve(args, sub, getattr(args, "_defaults", {}))
        del args._defaults
        if getattr(args, "out", None):
            _check_out(Path(args.out), args.command in _FOLDER_OUT)
        return args.func(args) or 0
    except CLIError as exc:
        print(f"kse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except EXPECTED_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        msg = " ".join(str(msg).split("\n"))  # one line, whatever the library wrote
        print(f"kse {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kse {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - unexpected: one line, the traceback on request
        if os.environ.get("KSE_DEBUG", "") not in ("", "0"):
            raise
        text = " ".join(str(exc).split())
        print(f"kse {args.command}: error: {type(exc).__name__}: {text[:500]} (unexpected; KSE_DEBUG=1 shows "
              "the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
