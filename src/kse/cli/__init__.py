"""The ``kse`` command: a thin layer over the library.

    kse train     train a baseline (from scratch or from torchvision's pretrained weights)
    kse models    list the registered model names
    kse analyze   per-layer KSE plan of a checkpoint (indicator, channels kept, centroids)
    kse compress  KSE-compress a checkpoint
    kse prune-l1  L1-norm filter pruning (Li et al. 2017), the baseline KSE is compared to
    kse prune     filter pruning peers: L1 uniform or Torch-Pruning's global group-magnitude pruning
    kse explain   what the KSE indicator says about each feature map, tested on real images
    kse finetune  fine-tune the centroids of a compressed checkpoint
    kse eval      accuracy, size, MACs and CPU latency of a checkpoint
    kse bench     CPU latency of each KSE layer and of the whole model
    kse deploy    choose each KSE layer's fastest CPU form by measuring, and save it
    kse export    ONNX + TorchScript files, verified against PyTorch
    kse demo      the whole pipeline on a trained checkpoint, with a before/after report

Every subcommand has ``--help`` and takes ``--config FILE.yaml`` for its defaults; commands
that write files save their resolved arguments beside them (``args.json``). Expected errors
(missing or corrupt file, unknown model or dataset, out-of-range value) print one line and exit
with status 2, no traceback; an unexpected error prints one line and exits with status 1
(``KSE_DEBUG=1`` shows its traceback).

``kse train`` and ``kse finetune`` run unchanged under ``torchrun --nproc_per_node N``: with
``WORLD_SIZE > 1`` they join the process group (nccl on CUDA, one GPU per process; gloo on
CPU), wrap the model in DistributedDataParallel, and only rank 0 writes files
(:mod:`kse.distributed`).

Layout: :mod:`kse.cli.common` holds the parser class, the shared flags, ``--config``
resolution, the error handling and the helpers commands share (loading checkpoints and data,
``--out`` checks); each command group is one module with a ``register(subparsers)`` function
(``train``, ``models``, ``compress``: analyze / compress / prune-l1 / prune, ``finetune``,
``explain``, ``evaluate``: eval / bench, ``deploy``: deploy / export, ``demo``). A new command is a module
whose ``register`` calls :func:`kse.cli.common.add_command`, and one entry in ``COMMANDS``.
The modules parse arguments, call the library and print; training, distributed and export
logic live in :mod:`kse.train`, :mod:`kse.distributed` and :mod:`kse.export`.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from . import compress, demo, deploy, evaluate, explain, finetune, models, train
from .common import CLIError, CommandParser, run_command

__all__ = ["COMMANDS", "CLIError", "build_parser", "main"]

#: command modules, in the order ``kse --help`` lists their commands
COMMANDS = (train, models, compress, explain, finetune, evaluate, deploy, demo)


def build_parser() -> CommandParser:
    """The ``kse`` parser; ``parser.commands`` maps each subcommand's name to its parser."""
    parser = CommandParser(prog="kse", description="KSE: compress CNNs with kernel sparsity and entropy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for module in COMMANDS:
        module.register(sub)
    parser.commands = dict(sub.choices)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``kse`` with ``argv`` (default: the command line); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(parser, args)


if __name__ == "__main__":
    sys.exit(main())
