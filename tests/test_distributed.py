"""`kse train` and `kse finetune` under torchrun: two CPU processes (gloo), one tiny FakeData epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from kse.models import get_model
from kse.train import state_digest

import kse
from kse.data import dataset_info


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "kse.cli", "train", "--arch", "resnet20", "--dataset", "fake", "--input-size", "16",
           "--fake-size", "32", "--batch-size", "4", "--max-steps", "2", "--epochs", "1",
           "--device", "cpu", "--lr", "0.05", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Files are written by rank 0 only: one metrics row, one progress line, no stray temporaries.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1
    assert proc.stderr.count("epoch 1/1:") == 1
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "last.ckpt", "metrics.jsonl", "model.kse"]

    # Every sample of the test set is evaluated exactly once across the two ranks.
    assert rows[0]["test_count"] == 8

    # Both ranks ended with bit-identical parameters and buffers, equal to what rank 0 saved.
    digests = rows[0]["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    saved = get_model("resnet20", num_classes=10, in_channels=3)
    tensors = load_file(str(out / "last.ckpt"))
    saved.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    assert state_digest(saved) == digests[0]
    # ... and training moved them away from the shared initialisation.
    torch.manual_seed(0)
    assert state_digest(get_model("resnet20", num_classes=10, in_channels=3)) != digests[0]


def test_torchrun_finetune_two_processes(tmp_path):
    """Fine-tuning a compressed model under torchrun: both ranks end with identical centroids."""
    net = get_model("resnet20", num_classes=10, in_channels=3)
    kse.compress_(net, kse.KSEConfig(G=4, input_size=(3, 16, 16)))
    start = tmp_path / "compressed.kse"
    kse.save(net, start, preprocess=dataset_info("fake").preprocess() | {"input_size": [3, 16, 16]})
    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "kse.cli", "finetune", "--checkpoint", str(start), "--dataset", "fake", "--fake-size", "32",
           "--batch-size", "4", "--max-steps", "2", "--epochs", "1", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    digests = rows[0]["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    tuned = kse.load(out / "model.kse")
    assert not torch.equal(tuned.layer2[1].conv1.centroids, net.layer2[1].conv1.centroids)
    assert torch.equal(tuned.layer2[1].conv1.assignment, net.layer2[1].conv1.assignment)  # frozen


# ----------------------------------------------------------------------------- kse.distributed in one process
def test_world_size_reads_torchrun_environment(monkeypatch):
    from kse import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert distributed.world_size() == 3
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="environment variable WORLD_SIZE must be an integer, got 'two'"):
        distributed.world_size()


def test_cuda_rank_without_a_gpu_is_refused(monkeypatch):
    from kse import distributed

    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(ValueError, match=rf"LOCAL_RANK {torch.cuda.device_count()} has no GPU .*--nproc_per_node"):
        distributed.init_distributed(torch.device("cuda"))


def test_revert_sync_batchnorm_restores_plain_batchnorm():
    from kse import distributed

    net = get_model("resnet20", num_classes=10, in_channels=3).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    plain = distributed.revert_sync_batchnorm(synced)
    kinds = {type(m) for m in plain.modules()}
    assert torch.nn.SyncBatchNorm not in kinds and torch.nn.BatchNorm2d in kinds
    assert not plain.training
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ref)
    lone = distributed.revert_sync_batchnorm(torch.nn.SyncBatchNorm(4).train())
    assert type(lone) is torch.nn.BatchNorm2d and lone.training


def test_one_process_group(monkeypatch):
    """init / samplers / DDP / teardown in a gloo group of one process."""
    import socket

    from torch.utils.data import TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from kse import distributed
    from kse.data import ShardSampler

    assert distributed.samplers([0] * 4, [0] * 4) == (None, None)  # outside a group
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    device = distributed.init_distributed(torch.device("cpu"))
    seen = {}

    def job() -> int:
        seen["initialized"] = distributed.is_initialized()
        train, test = distributed.samplers(TensorDataset(torch.zeros(6)), TensorDataset(torch.zeros(5)), seed=1)
        seen["samplers"] = (type(train), type(test), sorted(test))
        seen["ddp"] = type(distributed.wrap_ddp(torch.nn.Linear(2, 2), device))
        return 7

    assert device == torch.device("cpu")
    assert distributed.run_distributed(job) == 7
    assert seen == {"initialized": True, "samplers": (DistributedSampler, ShardSampler, [0, 1, 2, 3, 4]),
                    "ddp": torch.nn.parallel.DistributedDataParallel}
    assert not distributed.is_initialized()  # torn down after the job
