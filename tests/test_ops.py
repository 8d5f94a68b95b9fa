"""The kse:: operators (kse.ops): opcheck, each against a slow reference, the pure-PyTorch
fallbacks, and the operators captured by torch.export, torch.compile and AOTInductor."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kse
from kse import fused, ops
from kse.conv import KSEConv2d

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread for the module
ROOT = Path(__file__).resolve().parent.parent
needs_extension = pytest.mark.skipif(not ops.available(), reason=f"extension not built: {ops.build_error()}")


# ----------------------------------------------------------------------------- slow references
def fused_conv_loop(x, kept, cents, assign, scale, bias, kh, kw, ph, pw, relu):
    """y[b, n] = relu?(scale[n] * sum_j conv(x[b, kept[j]], centroid assign[n, j]) + bias[n]),
    one single-channel convolution per (output, kept channel)."""
    B, _, H, W = x.shape
    N, K = assign.shape
    out = torch.zeros(B, N, H + 2 * ph - kh + 1, W + 2 * pw - kw + 1, dtype=torch.float64)
    for n in range(N):
        for j in range(K):
            kernel = cents[int(assign[n, j])].reshape(1, 1, kh, kw).double()
            out[:, n] += F.conv2d(x[:, int(kept[j])].unsqueeze(1).double(), kernel, padding=(ph, pw))[:, 0]
    out = out * scale.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
    return out.relu() if relu else out


def expand_weight_loop(cents, rows):
    N, J = rows.shape
    out = torch.zeros(N, J, *cents.shape[1:], dtype=cents.dtype)
    for n in range(N):
        for j in range(J):
            if rows[n, j] >= 0:
                out[n, j] = cents[int(rows[n, j])]
    return out


def expand_weight_backward_loop(grad, rows, num_centroids):
    out = torch.zeros(num_centroids, *grad.shape[2:], dtype=torch.float64)
    for n in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            if rows[n, j] >= 0:
                out[int(rows[n, j])] += grad[n, j].double()
    return out


# ----------------------------------------------------------------------------- inputs
# (C, N, kernel, padding, H, W, B, relu, channels_last): same-size convolutions (the compact
# layout, masked taps), a valid one and a (3, 2) kernel (the padded layout), a 1x1 kernel
GEOMETRIES = [(6, 8, 3, 1, 7, 9, 2, False, False), (5, 7, 3, 1, 6, 6, 3, True, True),
              (8, 8, 3, 0, 9, 9, 2, False, False), (4, 6, (3, 2), (1, 0), 6, 5, 1, True, False),
              (5, 7, 1, 0, 5, 5, 2, False, True)]


def fused_conv_args(C, N, k, p, H, W, B, relu, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(C, N, k, 1, p)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(N, generator=g))
    counts = torch.randint(0, N + 1, (C,), generator=g)
    counts[0] = max(1, int(counts[0]))
    layer = KSEConv2d.from_conv(conv, counts).eval()
    if relu:
        layer.set_epilogue(torch.rand(N, generator=g) + 0.5, torch.randn(N, generator=g), relu=True)
    t = fused.prepare(layer)
    x = torch.randn(B, C, H, W, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kh, kw = layer.kernel_size
    ph, pw = fused.kernel_padding(layer)
    return (x, t["kept"], t["cents"], t["offsets"], t["assign"], t["scale"], t["bias"], t["chunks"], kh, kw, ph, pw,
            t["relu"])


def rows_and_cents(N=5, J=7, M=9, taps=(3, 3), own=False, dtype=torch.float32, seed=0):
    """Centroid rows [N, J] (-1: a zero kernel) and centroids [M, kh, kw]; with ``own`` each
    row serves one column only (as in a KSE layer), else rows are shared between columns."""
    g = torch.Generator().manual_seed(seed)
    if own:  # column j draws from its own block of rows
        per = max(1, M // J)
        rows = torch.randint(0, per, (N, J), generator=g) + torch.arange(J) * per
        rows = torch.where(rows < M, rows, -1)
    else:
        rows = torch.randint(0, M, (N, J), generator=g)
    rows[torch.rand(N, J, generator=g) < 0.2] = -1
    return rows.to(torch.int32).contiguous(), torch.randn(M, *taps, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------- the package
def test_sources_are_real_files_shipped_as_package_data():
    names = {p.name for p in ops.sources()}
    assert {"ops.cpp", "fused_conv.cpp", "expand_weight.cpp", "autograd.cpp", "bindings.cpp"} <= names
    assert (ops.CSRC / "kse.h").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["kse"]
    assert "csrc/*.cpp" in package_data and "csrc/*.h" in package_data
    for path in (ROOT / "src" / "kse").rglob("*.py"):  # no C++ inside Python strings
        text = path.read_text()
        assert "#include <" not in text and "TORCH_LIBRARY(" not in text, path


def test_build_name_is_a_hash_of_the_sources(tmp_path, monkeypatch):
    here = ops.build_name()
    copy = tmp_path / "csrc"
    shutil.copytree(ops.CSRC, copy)
    monkeypatch.setattr(ops, "CSRC", copy)
    name = ops.build_name()
    assert name.startswith("kse_ops_") and len(name) == len("kse_ops_") + 16
    assert name == here  # the same sources elsewhere (another checkout), the same name
    with open(copy / "kse.h", "a") as f:  # a header counts too
        f.write("\n")
    assert ops.build_name() != name


def test_the_build_compiles_copies_that_do_not_change_with_the_checkout(tmp_path):
    # torch's JIT build rebuilds when the same name is loaded from sources at another path: the
    # sources are copied into the build folder, and written only where their content differs
    files = ops._copy_sources(tmp_path / "csrc")
    assert sorted(p.name for p in files) == sorted(p.name for p in ops.sources() + sorted(ops.CSRC.glob("*.h")))
    assert all(p.read_bytes() == (ops.CSRC / p.name).read_bytes() for p in files)
    stamps = {p.name: p.stat().st_mtime_ns for p in files}
    (tmp_path / "csrc" / "ops.cpp").write_text("// edited")
    ops._copy_sources(tmp_path / "csrc")
    assert {p.name: p.stat().st_mtime_ns for p in files if p.name != "ops.cpp"} == {
        n: t for n, t in stamps.items() if n != "ops.cpp"}
    assert (tmp_path / "csrc" / "ops.cpp").read_bytes() == (ops.CSRC / "ops.cpp").read_bytes()
    assert not list((tmp_path / "csrc").glob(".*.tmp"))


# ----------------------------------------------------------------------------- opcheck
@needs_extension
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_opcheck_fused_conv(geometry):
    torch.library.opcheck(torch.ops.kse.fused_conv.default, fused_conv_args(*geometry))


@needs_extension
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("own,taps", [(True, (3, 3)), (False, (1, 3)), (True, (1, 1))])
def test_opcheck_expand_weight(channels_last, own, taps):
    rows, cents = rows_and_cents(taps=taps, own=own)
    torch.library.opcheck(torch.ops.kse.expand_weight.default,
                          (cents.requires_grad_(), rows, channels_last, own))


@needs_extension
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("own", [True, False])
def test_opcheck_expand_weight_backward(channels_last, own):
    rows, cents = rows_and_cents(own=own)
    grad = torch.randn(*rows.shape, *cents.shape[1:]).requires_grad_()  # its own backward: expand_weight
    torch.library.opcheck(torch.ops.kse.expand_weight_backward.default,
                          (grad, rows, cents.shape[0], channels_last, own))


# ----------------------------------------------------------------------------- against slow references
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_fused_conv_and_its_reference_equal_a_loop(geometry, assert_same_function):
    args = fused_conv_args(*geometry, seed=1)
    x, kept, cents, offsets, assign, scale, bias, chunks, kh, kw, ph, pw, relu = args
    want = fused_conv_loop(x, kept, cents, assign, scale, bias, kh, kw, ph, pw, relu)
    assert_same_function(ops.fused_conv_reference(*args).double(), want)
    if ops.available():
        got = ops.fused_conv(*args)
        assert_same_function(got.double(), want)
        # a channels_last input of a same-size convolution answers channels_last, as the fake kernel says
        assert got.is_contiguous(memory_format=torch.channels_last) == (
            geometry[-1] and got.shape[2:] == x.shape[2:] and got.shape[1] > 1)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("own", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expand_weight_and_its_backward_equal_loops(channels_last, own, dtype):
    rows, cents = rows_and_cents(N=6, J=19, M=40, own=own, dtype=dtype, seed=2)
    upstream = torch.randn(6, 19, 3, 3, dtype=dtype, generator=torch.Generator().manual_seed(3))
    want_w, want_g = expand_weight_loop(cents, rows), expand_weight_backward_loop(upstream, rows, 40)
    fns = [(ops.expand_weight_reference, ops.expand_weight_backward_reference)]
    if ops.available():
        fns.append((ops.expand_weight, ops.expand_weight_backward))
    for expand, backward in fns:
        c = cents.clone().requires_grad_()
        w = expand(c, rows, channels_last, own)
        assert torch.equal(w, want_w)
        assert w.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        grad, = torch.autograd.grad(w, c, upstream)
        torch.testing.assert_close(grad, want_g.to(dtype))  # float32: summed in another order
        torch.testing.assert_close(backward(upstream, rows, 40, channels_last, own), want_g.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_expand_weight_backward_sums_half_precision_in_float32(dtype):
    # 300 kernels on one centroid: summed in float32 and rounded once, within one rounding of the exact sum
    rows = torch.zeros(30, 10, dtype=torch.int32)
    grad = torch.randn(30, 10, 3, 3, generator=torch.Generator().manual_seed(4)).to(dtype)
    exact = expand_weight_backward_loop(grad, rows, 1)
    eps = torch.finfo(dtype).eps
    impls = [ops.expand_weight_backward_reference] + ([ops.expand_weight_backward] if ops.available() else [])
    for impl in impls:
        got = impl(grad, rows, 1, False)
        assert got.dtype == dtype
        assert ((got.double() - exact).abs() <= eps * exact.abs() + 1e-6).all()


@needs_extension
@pytest.mark.parametrize("channels_last", [True, False])
def test_gradients_of_gradients_run_through_the_operators(channels_last):
    # expand_weight's backward is expand_weight_backward and the other way round: gradgradcheck
    rows, cents = rows_and_cents(N=4, J=5, M=7, dtype=torch.float64, seed=5)
    cents.requires_grad_()
    assert torch.autograd.gradcheck(lambda c: ops.expand_weight(c, rows, channels_last), (cents,))
    assert torch.autograd.gradgradcheck(lambda c: ops.expand_weight(c, rows, channels_last), (cents,))
    grad = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g: ops.expand_weight_backward(g, rows, 7, channels_last), (grad,))


@needs_extension
def test_operators_check_their_inputs():
    rows, cents = rows_and_cents()
    grad = torch.randn(*rows.shape, 3, 3)
    with pytest.raises(RuntimeError, match="expand_weight_backward: a row index is out of range"):
        ops.expand_weight_backward(grad, rows, 2, False)  # rows up to 8 with only 2 centroids
    with pytest.raises(RuntimeError, match="grad must be a \\[N, J, kh, kw\\]"):
        ops.expand_weight_backward(grad[:2], rows, 9, False)
    with pytest.raises(RuntimeError, match="rows must be a contiguous int32"):
        ops.expand_weight(cents, rows.long(), False)
    args = list(fused_conv_args(*GEOMETRIES[0]))
    args[0] = args[0].double()
    with pytest.raises(RuntimeError, match="x must be a float32"):
        ops.fused_conv(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:  # the fake kernel refuses it too
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError, match="x must be float32"):
            torch.ops.kse.fused_conv.default(*fake)


# ----------------------------------------------------------------------------- fallbacks and switches
def test_public_functions_fall_back_to_the_references_without_the_extension(monkeypatch, assert_same_function):
    monkeypatch.setattr(ops, "_module", None)
    monkeypatch.setattr(ops, "_direct", None)
    monkeypatch.setattr(ops, "_error", "no compiler here")
    assert not ops.available() and ops.build_error() == "no compiler here" and ops.library_path() is None
    args = fused_conv_args(*GEOMETRIES[1])
    x, kept, cents, offsets, assign, scale, bias, chunks, kh, kw, ph, pw, relu = args
    assert_same_function(ops.fused_conv(*args).double(),
                         fused_conv_loop(x, kept, cents, assign, scale, bias, kh, kw, ph, pw, relu))
    tensors = dict(zip(["kept", "cents", "offsets", "assign", "scale", "bias", "chunks"], args[1:8]), relu=relu)
    torch.testing.assert_close(fused.fused_conv(x, tensors, (kh, kw), (ph, pw)), ops.fused_conv(*args))
    rows, c = rows_and_cents()
    c.requires_grad_()
    for expand in (ops.expand_weight, fused.expand_weight):
        w = expand(c, rows, True)
        assert w.grad_fn is not None and torch.equal(w, expand_weight_loop(c.detach(), rows))
    g = torch.randn(w.shape)
    torch.testing.assert_close(ops.expand_weight_backward(g, rows, len(c), True),
                               expand_weight_backward_loop(g, rows, len(c)).float())


@needs_extension
def test_direct_calls_switch_between_the_binding_and_the_dispatcher():
    args = fused_conv_args(*GEOMETRIES[0])
    rows, cents = rows_and_cents(own=True)
    cents.requires_grad_()
    seen = {}
    try:
        for direct in (True, False):
            ops.set_direct_calls(direct)
            assert ops.direct_calls() == direct
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                y = ops.fused_conv(*args)
                w = ops.expand_weight(cents, rows, False, True)
            names = {e.name for e in prof.events()}
            seen[direct] = ({"kse::fused_conv", "kse::expand_weight"} & names, y, w)
    finally:
        ops.set_direct_calls(True)
    # the kernel of fused_conv is called directly; expand_weight's autograd kernel calls the operator below it
    assert seen[True][0] == {"kse::expand_weight"} and seen[False][0] == {"kse::fused_conv", "kse::expand_weight"}
    assert torch.equal(seen[True][1], seen[False][1]) and torch.equal(seen[True][2], seen[False][2])
    assert "ExpandWeight" in seen[True][2].grad_fn.name() and "ExpandWeight" in seen[False][2].grad_fn.name()


# ----------------------------------------------------------------------------- export, compile, AOTInductor
def deployed_model(tiny_kse):
    model = tiny_kse()
    kse.deploy_(model, form="fused")
    fused_layers = sum(m.form == "fused" for m in model.modules() if isinstance(m, KSEConv2d))
    assert fused_layers > 0
    return model, fused_layers


@needs_extension
def test_torch_export_records_the_fused_operator_and_round_trips(tmp_path, tiny_kse, assert_same_function):
    model, fused_layers = deployed_model(tiny_kse)
    x = torch.randn(3, 1, 16, 16)
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    assert str(ep.graph).count("kse.fused_conv.default") == fused_layers
    torch.export.save(ep, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    with torch.no_grad():
        for b in (3, 1, 5):  # the batch axis stays dynamic
            xb = torch.randn(b, 1, 16, 16)
            assert_same_function(loaded(xb), model(xb), 1e-4)


@needs_extension
def test_torch_compile_captures_the_fused_operator_in_one_graph(tiny_kse, assert_same_function):
    from torch._dynamo.backends.common import aot_autograd

    model, fused_layers = deployed_model(tiny_kse)
    graphs = []

    def record(gm, example_inputs):  # the graph after AOTAutograd: fake kernels, functionalization
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=record), fullgraph=True)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():  # inference: the deployed forms (with gradients, the training form)
        got, want = compiled(x), model(x)
    assert len(graphs) == 1 and str(graphs[0].graph).count("kse.fused_conv.default") == fused_layers
    assert_same_function(got, want, 1e-4)


@needs_extension
@pytest.mark.slow
def test_inductor_and_aot_inductor_run_the_fused_operator(tmp_path, tiny_kse, assert_same_function):
    model, fused_layers = deployed_model(tiny_kse)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        want = model(x)
        torch._dynamo.reset()
        assert_same_function(torch.compile(model)(x), want, 1e-4)  # the default backend, inductor
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "model.pt2"))
    with torch.no_grad():
        assert_same_function(torch._inductor.aoti_load_package(path)(x), want, 1e-4)
    torch.save({"x": x, "want": want}, tmp_path / "io.pt")
    # a fresh interpreter: the package runs once the operator library is loaded
    script = ("import sys, torch\n"
              "import kse.ops\nassert kse.ops.load_library()\n"
              "io = torch.load(sys.argv[2], weights_only=True)\n"
              "with torch.no_grad():\n    got = torch._inductor.aoti_load_package(sys.argv[1])(io['x'][:2])\n"
              "print(float((got - io['want'][:2]).abs().max() / io['want'].abs().max()))\n")
    res = subprocess.run([sys.executable, "-c", script, path, str(tmp_path / "io.pt")], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.split()[-1]) < 1e-4
