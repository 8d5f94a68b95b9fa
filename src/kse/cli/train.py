"""``kse train``: train a baseline, from scratch or from torchvision's pretrained weights.

Runs unchanged under ``torchrun --nproc_per_node N`` (``kse.distributed``): only rank 0 writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from .common import CLIError, add_command, add_common, finite_float, loaders, parse_device, positive_int, save_args


def cmd_train(args: argparse.Namespace) -> int:
    from ..data import dataset_info
    from ..distributed import init_distributed, run_distributed, world_size
    from ..models import list_models
    from ..train import check_compile

    # Cheap checks first, so that a typo fails before any data is loaded.
    if args.arch not in list_models():
        raise CLIError(f"--arch: unknown model {args.arch!r}; choose one of: {', '.join(list_models())}")
    dataset_info(args.dataset)
    weights = _pretrained_weights(args.arch, args.weights)
    dev = parse_device(args.device)
    distributed = world_size() > 1
    if args.epochs == 0:
        if weights is None:
            raise CLIError("epochs must be an integer >= 1, got 0; --epochs 0 is only for saving --weights "
                           "(torchvision pretrained weights) untrained")
        if distributed:
            raise CLIError("--epochs 0 only saves the --weights model; run it without torchrun")
        return _save_pretrained(args, weights)
    if args.compile:
        check_compile(dev)
    if args.sync_bn and distributed and dev.type != "cuda":
        raise CLIError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); drop it for CPU runs")
    if not distributed:
        if args.sync_bn:
            print("kse train: note: --sync-bn has no effect in a single process", file=sys.stderr)
        return _train(args, dev, distributed=False)
    dev = init_distributed(dev)
    return run_distributed(lambda: _train(args, dev, distributed=True))


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
    from ..models import get_model

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
    from ..data import dataset_info, get_dataset
    from ..serialization import save

    info = dataset_info(args.dataset)
    if args.dataset == "fake" or not info.num_classes:  # FakeData's size is --input-size; imagefolder counts classes
        _, info = get_dataset(args.dataset, args.data_dir, False, fake_size=args.fake_size,
                              input_size=args.input_size)
    model = _build_model(args, info, weights)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_args(args, out)
    final = out / "model.kse"
    save(model.cpu(), final, preprocess=info.preprocess(), extra={"pretrained": weights})
    print(f"wrote {final} (torchvision {weights}, not trained further)")
    return 0


def _train(args: argparse.Namespace, dev: torch.device, distributed: bool) -> int:
    from ..distributed import revert_sync_batchnorm, wrap_ddp
    from ..train import TrainConfig, fit, is_main_process

    out = Path(args.out)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, schedule=args.schedule,
                      weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, seed=args.seed,
                      amp=args.amp, channels_last=args.channels_last, max_steps_per_epoch=args.max_steps,
                      compile=args.compile, swa_from=args.swa_from)
    train_loader, test_loader, info = loaders(args.dataset, args.data_dir, args.batch_size, args.workers,
                                              args.fake_size, args.input_size, args.seed)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    weights = _pretrained_weights(args.arch, args.weights)
    model = _build_model(args, info, weights).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = wrap_ddp(model, dev, args.sync_bn) if distributed else model
    out.mkdir(parents=True, exist_ok=True)
    save_args(args, out)
    fit(net, train_loader, test_loader, cfg, out, dev, resume=args.resume)
    if is_main_process():
        from .. import serialization  # imported late: a long run picks up the current file format code

        final = out / "model.kse"
        trained = net.module if distributed else net
        serialization.save(revert_sync_batchnorm(trained).cpu(), final, preprocess=info.preprocess(),
                           extra={"pretrained": weights} if weights else None)
        print(f"wrote {final}")
    return 0


def register(subparsers) -> None:
    p = add_command(
        subparsers, "train", cmd_train, folder_out=True,
        defaults=dict(arch="resnet56", dataset="fashion-mnist", out="runs/train", epochs=30, lr=0.1, batch_size=128,
                      schedule="cosine", weight_decay=5e-4, warmup_epochs=0.0, workers=0, amp=False,
                      channels_last=True, resume=False, sync_bn=False, seed=0, max_steps=None, fake_size=256,
                      input_size=None, compile=False, swa_from=None),
        help="train a baseline (from scratch or from torchvision weights)",
        description="Train a baseline model; writes last.ckpt every epoch, metrics.jsonl and model.kse. "
                    "With --weights (torchvision models), start from pretrained weights; with "
                    "--weights and --epochs 0, only save them as OUT/model.kse.")
    add_common(p, "arch", "dataset", "data-dir", "out", "epochs", "lr", "batch-size", "device", "seed")
    p.add_argument("--weights", default=None, metavar="NAME",
                   help="torchvision pretrained weights to start from (DEFAULT, IMAGENET1K_V1, ...; none: random "
                        "initialisation, the default); read from torchvision's cache, downloaded there if missing")
    p.add_argument("--schedule", choices=["cosine", "multistep"], default=None)
    p.add_argument("--weight-decay", type=finite_float, default=None)
    p.add_argument("--warmup-epochs", type=finite_float, default=None)
    add_common(p, "workers", "amp", "channels-last", "compile", "resume", "max-steps", "fake-size", "swa-from")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch")
    p.add_argument("--input-size", type=positive_int, default=None, help="FakeData image size")
