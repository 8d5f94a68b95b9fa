"""CUDA paths: the same results on the GPU as on the CPU (skipped where no GPU is present).

Run on a machine with a GPU: ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kse
from kse.conv import KSEConv2d
from kse.forms import INFERENCE_FORMS, parse_form
from kse.models import get_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    """Compare the math in float32: cuDNN convolutions default to TF32 (10-bit mantissa), under
    which two forms of one layer differ by about 1e-3 relative."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return get_model("resnet20", num_classes=10, in_channels=1).eval()


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> None:
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=rel, atol=rel * float(b.abs().max()))


def test_indicator_and_counts_match_the_cpu():
    net = _net()
    cfg = kse.KSEConfig(G=4, input_size=(1, 28, 28))
    cpu_plan = kse.plan(net, cfg)
    gpu_plan = kse.plan(copy.deepcopy(net).to(CUDA), cfg)
    assert [p.name for p in cpu_plan] == [p.name for p in gpu_plan]
    for a, b in zip(cpu_plan, gpu_plan):
        assert b.indicator.device.type == "cuda"
        _close(b.indicator, a.indicator, 1e-4)
        # counts come from the indicator by ceil(): equal unless a value sits on a boundary
        assert (a.counts != b.counts.cpu()).sum() <= 1, a.name


def test_compress_on_cuda_runs_there_and_matches_its_cpu_copy():
    net = _net().to(CUDA)
    small = kse.compress(net, kse.KSEConfig(G=4, input_size=(1, 28, 28)))
    layers = [m for m in small.modules() if isinstance(m, KSEConv2d)]
    assert layers and all(m.centroids.is_cuda and m.assignment.is_cuda for m in layers)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        got = small(x.to(CUDA))
        ref = copy.deepcopy(small).cpu()(x)
    _close(got, ref)
    # clustering quality on the GPU: the compressed net stays close to the dense one
    with torch.no_grad():
        dense = net(x.to(CUDA))
    assert F.cosine_similarity(got.flatten(), dense.flatten(), dim=0) > 0.5


@pytest.mark.parametrize("form", INFERENCE_FORMS + ("fused",))
def test_every_form_equals_training_form_on_cuda(form):
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 24, 3, padding=1, bias=True)
    counts = torch.randint(0, 25, (16,))
    counts[0] = 3
    layer = KSEConv2d.from_conv(conv, counts).to(CUDA).eval()
    x = torch.randn(3, 16, 12, 12, device=CUDA)
    with torch.no_grad():
        ref = layer(x)
        got = layer.set_form(form)(x)
        got_cl = layer(x.contiguous(memory_format=torch.channels_last))
    _close(got, ref, 1e-5)
    _close(got_cl, ref, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_training_step_updates_centroids(dtype):
    net = kse.compress(_net(), kse.KSEConfig(G=4, input_size=(1, 28, 28))).to(CUDA).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    x, y = torch.randn(16, 1, 28, 28, device=CUDA), torch.randint(0, 10, (16,), device=CUDA)
    layer = next(m for m in net.modules() if isinstance(m, KSEConv2d))
    before = layer.centroids.detach().clone()
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # three steps on one batch lower its loss
    assert not torch.equal(layer.centroids.detach(), before)
    assert layer.centroids.dtype == torch.float32  # master weights stay float32


def test_deploy_auto_on_cuda_and_round_trip_through_a_file(tmp_path):
    net = kse.compress(_net(), kse.KSEConfig(G=4, input_size=(1, 28, 28))).to(CUDA).eval()
    x = torch.randn(8, 1, 28, 28, device=CUDA)
    with torch.no_grad():
        ref = net(x)
        chosen = kse.deploy_(net, form="auto", input_size=(1, 28, 28), batch_size=(1, 8), repeats=2)
        got = net(x)
    assert all(f in INFERENCE_FORMS for form in chosen.values() for _, f in parse_form(form))
    _close(got, ref, 1e-5)
    path = tmp_path / "net.kse"
    kse.save(net, path)
    back = kse.load(path, device="cuda")
    assert {n: m.form for n, m in back.named_modules() if isinstance(m, KSEConv2d)} == chosen
    with torch.no_grad():
        _close(back(x), ref, 1e-5)


@pytest.mark.parametrize("form", INFERENCE_FORMS)
def test_folded_batchnorm_on_cuda_equals_the_unfolded_model(form):
    small = kse.compress(_net(), kse.KSEConfig(G=4, input_size=(1, 28, 28))).to(CUDA).eval()
    g = torch.Generator().manual_seed(0)
    for bn in (m for m in small.modules() if isinstance(m, nn.BatchNorm2d)):  # away from the identity
        n = bn.num_features
        bn.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        with torch.no_grad():
            bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
    kse.deploy_(small, form=form)
    folded = kse.fold_batchnorm(small)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(m.epilogue[0].is_cuda for m in folded.modules() if isinstance(m, KSEConv2d))
    x = torch.randn(3, 1, 28, 28, device=CUDA)
    with torch.no_grad():
        _close(folded(x), small(x))
