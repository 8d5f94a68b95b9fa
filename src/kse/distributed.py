"""Distributed data-parallel set-up for training under ``torchrun``.

``torchrun --nproc_per_node N`` starts N processes and describes the group in environment
variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). These
functions join that group (nccl on CUDA, one GPU per process; gloo on CPU), wrap a model in
``DistributedDataParallel``, give each process its shard of the data, and undo
``SyncBatchNorm`` before a model is saved::

    >>> from kse import distributed
    >>> if distributed.world_size() > 1:                      # doctest: +SKIP
    ...     device = distributed.init_distributed(torch.device("cpu"))
    ...     rc = distributed.run_distributed(lambda: train(distributed.wrap_ddp(model, device)))
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn


def world_size() -> int:
    """Number of processes ``torchrun`` started (``WORLD_SIZE``; 1 outside torchrun)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE must be an integer, got {raw!r}") from None


def is_initialized() -> bool:
    """Whether this process is in a process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group that ``torchrun`` describes; return this process's device.

    On CUDA each process takes the GPU of its ``LOCAL_RANK`` (nccl); on CPU the group uses gloo.
    """
    import torch.distributed as dist

    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} has no GPU (this machine has {torch.cuda.device_count()}); "
                             "use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local_rank)  # NOTE: one GPU per process; an index in the device is ignored
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def run_distributed(job: Callable[[], int]) -> int:
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


def wrap_ddp(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (with ``sync_bn``, its BatchNorm layers first
    turned into ``SyncBatchNorm``: statistics over the global batch, CUDA only)."""
    from torch.nn.parallel import DistributedDataParallel

    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo ``convert_sync_batchnorm``: plain ``BatchNorm2d`` layers holding the same state.

    Changes ``module`` in place and returns it (or the new layer when ``module`` itself is one).
    """
    if isinstance(module, nn.SyncBatchNorm):
        bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        bn.load_state_dict(module.state_dict())  # onto the CPU: the caller exports from there
        return bn.train(module.training)
    for name, child in list(module.named_children()):
        new = revert_sync_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def samplers(train_set, test_set, seed: int = 0) -> Tuple[Optional[torch.utils.data.Sampler],
                                                          Optional[torch.utils.data.Sampler]]:
    """``(train, test)`` samplers for this process: ``(None, None)`` outside a process group;
    in one, a shuffled ``DistributedSampler`` for training and a ``ShardSampler`` that gives
    every test sample to exactly one rank."""
    if not is_initialized():
        return None, None
    from torch.utils.data.distributed import DistributedSampler

    from .data import ShardSampler

    return (DistributedSampler(train_set, shuffle=True, seed=seed),
            ShardSampler(test_set, torch.distributed.get_rank(), torch.distributed.get_world_size()))
