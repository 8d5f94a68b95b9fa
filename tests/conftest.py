"""Fixtures shared by the tests (pytest finds them here; no test imports a helper module).

- ``one_thread`` (module scope): one torch thread and no torchrun environment for a whole test
  module; a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
- ``run``, ``ok``, ``one_error_line``: the ``kse`` command run in process (``kse.cli.main``).
- ``failing_compile``: ``torch.compile`` replaced by one whose model raises a given exception;
  ``compiler``: skips a test where ``torch.compile`` has no C++ compiler on the CPU.
- ``tiny_kse``: a small KSE-compressed model; ``assert_same_function``: the tolerance at which a
  fast form is compared with its slow reference.
- Slow references, plain loops that fast code is checked against: ``reference_forward`` (a KSE
  layer's output, one centroid convolution per output and kept channel) and ``slow_entropy``
  (the kernel entropy of Eqs. 5-6, per channel and kernel).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from typing import Callable, Sequence, Tuple

import pytest
import torch


# ----------------------------------------------------------------------------- environment
@pytest.fixture(scope="module")
def one_thread():
    """One torch thread and no torchrun environment for a whole test module."""
    # NOTE: other jobs may share this machine's cores; one thread keeps the timings sane
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.pop("WORLD_SIZE", None)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def compiler() -> None:
    """Skip the test where ``torch.compile`` has no C++ compiler on the CPU."""
    from kse.train import CompileError, check_compile

    try:
        check_compile(torch.device("cpu"))
    except CompileError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def failing_compile(monkeypatch) -> Callable[[BaseException], None]:
    """``failing_compile(exc)``: from then on (for the test), the model that ``torch.compile``
    returns raises ``exc`` when called, as a compilation that fails at the first step does."""
    def install(exc: BaseException) -> None:
        def compile_(model, *args, **kwargs):
            def run(*a, **k):
                raise exc
            return run

        monkeypatch.setattr(torch, "compile", compile_)

    return install


# ----------------------------------------------------------------------------- the command line
def _run(argv: Sequence) -> Tuple[int, str, str]:
    from kse.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _ok(argv: Sequence) -> Tuple[str, str]:
    code, out, err = _run(argv)
    assert code == 0, err
    assert "Traceback" not in err
    return out, err


def _one_error_line(argv: Sequence) -> str:
    code, out, err = _run(argv)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    # progress lines may come first; the error is one line, the last
    assert [line for line in lines if ": error: " in line] == lines[-1:], err
    return lines[-1]


@pytest.fixture(scope="session")
def run() -> Callable[[Sequence], Tuple[int, str, str]]:
    """``run(argv)``: ``kse.cli.main(argv)`` in process; returns ``(exit code, stdout, stderr)``."""
    return _run


@pytest.fixture(scope="session")
def ok() -> Callable[[Sequence], Tuple[str, str]]:
    """``ok(argv)``: run ``argv``, expect success without a traceback; returns ``(stdout, stderr)``."""
    return _ok


@pytest.fixture(scope="session")
def one_error_line() -> Callable[[Sequence], str]:
    """``one_error_line(argv)``: run ``argv``, expect exit status 2 and exactly one error line on
    stderr, the last (progress lines may precede it; no traceback); returns that line."""
    return _one_error_line


# ----------------------------------------------------------------------------- models and references
def _tiny_kse(G: int = 4) -> torch.nn.Module:
    import kse
    from kse.models import get_model

    return kse.compress(get_model("resnet20", num_classes=10, in_channels=1).eval(),
                        kse.KSEConfig(G=G, input_size=(1, 16, 16)))


def _assert_same_function(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(got, ref, rtol=rel, atol=rel * ref.abs().max().item())


@pytest.fixture(scope="session")
def tiny_kse() -> Callable[..., torch.nn.Module]:
    """``tiny_kse(G=4)``: a KSE-compressed one-channel ResNet-20 for 16x16 inputs, in eval mode
    (quick to build); a new model on every call."""
    return _tiny_kse


@pytest.fixture(scope="session")
def assert_same_function() -> Callable[..., None]:
    """``assert_same_function(got, ref, rel=1e-5)``: equal within ``rel`` of the reference's
    largest magnitude (float32 reassociation)."""
    return _assert_same_function


def _reference_forward(layer, x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    cols = []
    for n in range(layer.out_channels):
        acc = 0
        for j, c in enumerate(layer.kept_channels.tolist()):
            kernel = layer.centroids[layer.assignment[j, n]]
            acc = acc + F.conv2d(x[:, c:c + 1], kernel[None, None], None, layer.stride, layer.padding, layer.dilation)
        if layer.bias is not None:
            acc = acc + layer.bias[n]
        if layer.epilogue is not None:  # (scale, shift, relu), e.g. a folded BatchNorm
            acc = acc * layer.epilogue[0][n] + layer.epilogue[1][n]
        cols.append(acc if torch.is_tensor(acc) else None)
    out = torch.cat(cols, 1)
    return out.relu() if layer.epilogue is not None and layer.epilogue[2] else out


def _slow_entropy(weight: torch.Tensor, k: int = 5) -> torch.Tensor:
    N, C = weight.shape[:2]
    out = []
    for c in range(C):
        kernels = [weight[n, c].flatten().double() for n in range(N)]
        kk = min(k, N - 1)
        dm = []
        for n in range(N):
            d = sorted(float(torch.linalg.norm(kernels[n] - kernels[j])) for j in range(N) if j != n)
            dm.append(sum(d[:kk]))
        total = sum(dm)
        p = [x / total for x in dm] if total > 0 else [1 / N] * N
        out.append(-sum(pi * math.log2(pi) for pi in p if pi > 0))
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture(scope="session")
def reference_forward() -> Callable[..., torch.Tensor]:
    """``reference_forward(layer, x)``: a ``KSEConv2d``'s output ``Tensor[B, N, H', W']`` by a
    loop over outputs and kept channels, a convolution with each kernel's centroid (slow); the
    layer's epilogue (scale, shift, ReLU) applied last."""
    return _reference_forward


@pytest.fixture(scope="session")
def slow_entropy() -> Callable[..., torch.Tensor]:
    """``slow_entropy(weight, k=5)``: kernel entropy per input channel, ``Tensor[C]`` float64,
    of ``weight: Tensor[N, C, kh, kw]`` by a plain loop over channels and kernels (Eqs. 5-6:
    each kernel's summed distance to its ``k`` nearest kernels, normalised, Shannon entropy)."""
    return _slow_entropy


def _seeded_conv(C: int, N: int, k, stride=1, padding=1, dilation=1, bias=True,
                 seed: int = 0) -> Tuple[torch.nn.Conv2d, torch.Generator]:
    """A ``Conv2d`` with standard-normal weights (and bias) drawn from a generator seeded with
    ``seed``; the generator, to draw more from the same stream."""
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(C, N, k, stride, padding, dilation, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        if bias:
            conv.bias.copy_(torch.randn(N, generator=g))
    return conv, g


@pytest.fixture(scope="session")
def seeded_conv() -> Callable[..., Tuple[torch.nn.Conv2d, torch.Generator]]:
    """``seeded_conv(C, N, k, stride, padding, dilation, bias, seed)``: a reproducible random conv
    and its generator."""
    return _seeded_conv


def _fresh_interpreter(loader: str, path, x: torch.Tensor, ref: torch.Tensor, tmp_path) -> Tuple[bool, float]:
    """Run the saved model file ``path`` in a new Python process with ``loader`` (such as
    ``"torch.jit.load"``): first without the kse operator library (is it refused?), then after
    ``kse.ops.load_library()``, on ``x``; returns (refused without the library, max relative
    difference to ``ref``)."""
    import subprocess
    import sys

    torch.save({"x": x, "ref": ref}, tmp_path / "io.pt")
    script = ("import sys, torch\n"
              f"try:\n    {loader}(sys.argv[1]); print('loaded without the library')\n"
              "except Exception:\n    print('refused')\n"
              "import kse.ops\nassert kse.ops.load_library()\n"
              "io = torch.load(sys.argv[2], weights_only=True)\n"
              f"with torch.no_grad():\n    got = {loader}(sys.argv[1])(io['x'])\n"
              "print('max diff', float((got - io['ref']).abs().max() / io['ref'].abs().max()))\n")
    res = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "io.pt")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and lines[1].startswith("max diff"), res.stdout
    return lines[0] == "refused", float(lines[1].split()[-1])


@pytest.fixture(scope="session")
def fresh_interpreter() -> Callable[..., Tuple[bool, float]]:
    """``fresh_interpreter(loader, path, x, ref, tmp_path)``: a saved model run in a new process,
    without then with the kse operator library (see :func:`_fresh_interpreter`)."""
    return _fresh_interpreter

