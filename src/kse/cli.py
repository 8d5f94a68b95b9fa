"""The ``kse`` command: a thin layer over the library.

Every subcommand has ``--help``. Expected errors (missing or corrupt file, unknown model or
dataset, out-of-range value) print one line and exit with status 2, no traceback.

``kse train`` runs unchanged under ``torchrun --nproc_per_node N``: with ``WORLD_SIZE > 1`` it
joins the process group (nccl on CUDA, one GPU per process; gloo on CPU), wraps the model in
DistributedDataParallel, and only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

EXPECTED_ERRORS = (ValueError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError,
                   FloatingPointError, KeyError)


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


def _save_args(args: argparse.Namespace, folder: Path) -> None:
    from .atomic import write_text
    from .train import is_main_process

    if is_main_process():
        data = {k: v for k, v in vars(args).items() if k != "func"}
        write_text(folder / "args.json", json.dumps(data, indent=2, default=str) + "\n")


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
    device = _device(args.device)
    distributed = _world_size() > 1
    if args.sync_bn and distributed and device.type != "cuda":
        raise CLIError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); drop it for CPU runs")
    if not distributed:
        if args.sync_bn:
            print("kse train: note: --sync-bn has no effect in a single process", file=sys.stderr)
        return _train(args, device, distributed=False)
    import torch.distributed as dist

    device = _init_distributed(device)
    try:
        return _train(args, device, distributed=True)
    finally:
        dist.destroy_process_group()


def _train(args: argparse.Namespace, device: torch.device, distributed: bool) -> int:
    from .models import get_model
    from .train import TrainConfig, fit, is_main_process

    out = Path(args.out)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, schedule=args.schedule,
                      weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, seed=args.seed,
                      amp=args.amp, channels_last=args.channels_last, max_steps_per_epoch=args.max_steps)
    train_loader, test_loader, info = _loaders(args.dataset, args.data_dir, args.batch_size, args.workers,
                                               args.fake_size, args.input_size, args.seed)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = get_model(args.arch, num_classes=info.num_classes, in_channels=info.in_channels).to(device)
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
        serialization.save(_revert_sync_batchnorm(trained).cpu(), final, preprocess=info.preprocess())
        print(f"wrote {final}")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from scratch",
                       description="Train a baseline model; writes last.ckpt every epoch, metrics.jsonl and model.kse.")
    _config_file(p)
    _common(p, "arch", "dataset", "data-dir", "out", "epochs", "lr", "batch-size", "device", "seed")
    p.add_argument("--schedule", choices=["cosine", "multistep"], default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--workers", type=int, default=None, help="data-loader worker processes")
    p.add_argument("--amp", action="store_true", default=None, help="mixed precision (CUDA only)")
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


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kse", description="KSE: compress CNNs with kernel sparsity and entropy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
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
        return args.func(args) or 0
    except CLIError as exc:
        print(f"kse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except EXPECTED_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"kse {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kse {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
