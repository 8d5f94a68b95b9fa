"""`kse train` and `kse finetune` under torchrun: two CPU processes (gloo), one tiny FakeData epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
