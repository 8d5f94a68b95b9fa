"""``kse finetune``: fine-tune the centroids of a KSE-compressed checkpoint (assignments frozen).

Runs unchanged under ``torchrun --nproc_per_node N`` (``kse.distributed``): only rank 0 writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .common import (CLIError, add_command, add_common, check_dataset_fits, checkpoint_path, dataset_name, parse_device,
                     fake_input_size, finite_float, kse_layers, load_model, loaders, save_args, stage, training_extension)


def _finetune_config(args: argparse.Namespace):
    from ..train import TrainConfig

    # docs/method.md §6: SGD momentum 0.9, weight decay 1e-5, lr 0.01, lr x0.1 at half the run (CIFAR-10);
    # ImageNet drops at epochs 7 and 14 of 21, hence --milestones (fractions of the run, as in TrainConfig)
    milestones = args.milestones if isinstance(args.milestones, (list, tuple)) else [args.milestones]  # YAML: 0.5
    official = bool(args.official_sgd)
    return TrainConfig(epochs=args.epochs, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                       batch_size=args.batch_size, schedule=args.schedule, milestones=milestones, gamma=0.1,
                       seed=args.seed, channels_last=args.channels_last, max_steps_per_epoch=args.max_steps,
                       amp=bool(args.amp), compile=bool(args.compile), nesterov=not official,
                       decay_norm_and_bias=official, swa_from=args.swa_from)


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..distributed import init_distributed, run_distributed, world_size
    from ..train import check_compile

    path = checkpoint_path(args)
    if not args.out:
        raise CLIError("--out is required: the folder for last.ckpt, metrics.jsonl and model.kse")
    cfg = _finetune_config(args)
    dev = parse_device(args.device)
    if cfg.compile:
        check_compile(dev)
    if world_size() <= 1:
        return _finetune(args, path, cfg, dev, distributed=False)
    dev = init_distributed(dev)
    return run_distributed(lambda: _finetune(args, path, cfg, dev, distributed=True))


def _finetune(args: argparse.Namespace, path: Path, cfg, dev: torch.device, distributed: bool) -> int:
    from ..distributed import wrap_ddp
    from ..serialization import save
    from ..train import fit, is_main_process

    model = load_model(path)  # every rank loads the same file: identical KSE layers everywhere
    layers = kse_layers(model)
    if not layers:
        stage("finetune", f"note: {path} has no KSE layers; fine-tuning it as a dense model")
    for m in layers.values():
        m.set_form("train")  # a deployed layer caches its weight; training needs the centroids
    name = dataset_name(model, args, path)
    train_loader, test_loader, info = loaders(name, args.data_dir, cfg.batch_size, args.workers, args.fake_size,
                                              fake_input_size(model), args.seed)
    check_dataset_fits(model, info, path)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_args(args, out)
    model.to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = wrap_ddp(model, dev, False) if distributed else model
    if is_main_process():
        stage("finetune", f"{len(layers)} KSE layers, {cfg.epochs} epochs on {name}, lr {cfg.lr}, "
                          f"{cfg.schedule}, device {dev}")
    if not cfg.compile:  # compiled steps build W' with the operations torch.compile traces
        training_extension("finetune", model, dev, say=is_main_process())
    history = fit(net, train_loader, test_loader, cfg, out, dev, resume=args.resume)
    if is_main_process():
        final = out / "model.kse"
        extra = {**(getattr(model, "kse_extra", None) or {}), "finetuned_from": str(path),
                 "finetune": {"epochs": cfg.epochs, "lr": cfg.lr, "milestones": cfg.milestones,
                              "max_steps_per_epoch": cfg.max_steps_per_epoch, "swa_from": cfg.swa_from,
                              "test_top1": history[-1]["test_top1"] if history else None}}
        save(model.cpu().to(memory_format=torch.contiguous_format), final, preprocess=model.kse_preprocess,
             extra=extra)
        print(f"wrote {final}")
    return 0


def register(subparsers) -> None:
    p = add_command(
        subparsers, "finetune", cmd_finetune, folder_out=True,
        defaults=dict(epochs=20, lr=0.01, batch_size=128, schedule="multistep", milestones=[0.5], weight_decay=1e-5,
                      workers=0, amp=False, channels_last=True, resume=False, seed=0, max_steps=None, fake_size=256,
                      official_sgd=False, compile=False, swa_from=None),
        help="fine-tune a compressed checkpoint",
        epilog="Defaults: 20 epochs (the paper runs 200 on CIFAR-10), lr 0.01, batch 128, the dataset "
               "recorded in the checkpoint.",
        description="Fine-tune the centroids of a KSE-compressed model (assignments frozen) with the "
                    "paper's recipe (docs/method.md §6: SGD momentum 0.9, weight decay 1e-5, lr 0.01, x0.1 at "
                    "half the run unless --milestones says otherwise); writes last.ckpt every epoch, "
                    "metrics.jsonl and OUT/model.kse.")
    add_common(p, "checkpoint", "dataset", "data-dir", "out", "epochs", "lr", "batch-size", "device", "seed")
    p.add_argument("--schedule", choices=["cosine", "multistep"], default=None, help="default: multistep (paper)")
    p.add_argument("--milestones", type=finite_float, nargs="+", default=None, metavar="FRAC",
                   help="multistep: lr x0.1 at these fractions of --epochs (default 0.5, the paper's CIFAR-10 "
                        "recipe; its ImageNet one, epochs 7 and 14 of 21: 0.3333333333 0.6666666666)")
    p.add_argument("--weight-decay", type=finite_float, default=None, help="default 1e-5 (paper)")
    p.add_argument("--official-sgd", action="store_true", default=None,
                   help="the authors' optimizer: plain momentum and weight decay on every parameter (default: "
                        "Nesterov momentum, no decay on BatchNorm and bias parameters)")
    add_common(p, "workers", "amp", "channels-last", "compile", "resume", "max-steps", "fake-size", "swa-from")
