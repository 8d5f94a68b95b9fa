"""``kse models``: list the registered model names."""

from __future__ import annotations

import argparse

from .common import add_command


def cmd_models(args: argparse.Namespace) -> int:
    from ..models import list_models

    for name in list_models():
        print(name)
    return 0


def register(subparsers) -> None:
    add_command(subparsers, "models", cmd_models, defaults={}, config=False, help="list the registered model names",
                description="List every model name accepted by --arch (CIFAR ResNets, DenseNet-40, torchvision).")
