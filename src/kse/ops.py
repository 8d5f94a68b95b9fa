"""The ``kse::`` operators: KSE's fused centroid convolution and training weight (Li et al., CVPR 2019).

Three operators, with C++ CPU kernels in ``kse/csrc/`` (schemas in ``ops.cpp``):

* ``kse::fused_conv(x, kept, cents, offsets, assign, scale, bias, chunks, kh, kw, ph, pw, relu)``,
  the deployed form of a KSE layer (Sec. 3.5, Fig. 2: centroid convolution, then channel
  fusion) in one pass::

      y[b, n] = relu?(scale[n] * sum_j conv(x[b, kept[j]], cents[assign[n, j]]) + bias[n])

  with ``x: Tensor[B, C, H, W]`` float32, ``kept: int64[K]``, ``cents: float32[M, kh * kw]``
  (the centroids of kept channel j are rows ``offsets[j] .. offsets[j + 1] - 1``, ``offsets:
  int32[K + 1]``), ``assign: int32[N, K]``, ``scale, bias: float32[N]``, ``chunks: int32[n + 1]``
  (kept channels processed together, :func:`kse.fused.chunk_rows`), stride 1 and padding
  ``(ph, pw)`` -> ``Tensor[B, N, H + 2 ph - kh + 1, W + 2 pw - kw + 1]`` (channels_last for a
  channels_last input of a same-size convolution).
* ``kse::expand_weight(cents, rows, channels_last, disjoint=False)``, the weight a training step
  convolves with (Sec. 3.4): ``W'[n, j] = cents[rows[n, j]]``, zero where ``rows[n, j] = -1``;
  ``cents: Tensor[M, kh, kw]``, ``rows: int32[N, J]`` -> ``Tensor[N, J, kh, kw]`` laid out
  ``channels_last`` or NCHW. Differentiable in ``cents``: the gradient of a centroid is the sum
  of the gradients of the kernels that use it (assignments are frozen, centroids trained).
* ``kse::expand_weight_backward(grad, rows, num_centroids, channels_last, disjoint=False)``,
  that sum: ``Tensor[N, J, kh, kw]`` -> ``Tensor[M, kh, kw]`` (float16 / bfloat16 summed in
  float32). ``disjoint`` promises that no row serves two columns ``j`` (true in a KSE layer,
  where each input channel has its own centroids): the columns are then reduced in parallel.

This module gives each its fake (meta) kernel (``torch.library.register_fake``), so that
``torch.compile``, ``torch.export`` and AOTInductor trace the operators, and a pure-PyTorch
reference of each (:func:`fused_conv_reference`, :func:`expand_weight_reference`,
:func:`expand_weight_backward_reference`), which the public functions here run where the
extension is not built, as ``torchvision.ops`` does. The backward of ``expand_weight`` is
``expand_weight_backward``, whose own backward is ``expand_weight`` (it is linear in the
gradient), so gradients of gradients work.

NOTE: these two autograd formulas are registered in C++ (``csrc/autograd.cpp``, as torchvision
does), not with ``torch.library.register_autograd``: a formula in Python costs tens of
microseconds more per call, and a training step calls ``expand_weight`` once per layer
(``benchmarks/train_weight.py`` times it). They call the operators through the dispatcher, so
compiled and exported graphs record both.

The extension is compiled on first use (:func:`load_library`; a C++ compiler and ninja are
needed, then it is cached under ``~/.cache/torch_extensions``) from the files shipped in
``kse/csrc``, under a name made of a hash of the sources, the compiler flags and the torch
version: an edited source builds anew, and two versions can live side by side. Setting
``KSE_NO_EXTENSION=1`` before the first use keeps it from building.

Example::

    >>> import torch
    >>> from kse import ops
    >>> cents = torch.randn(3, 3, 3, requires_grad=True)
    >>> rows = torch.tensor([[0, -1], [2, 1]], dtype=torch.int32)
    >>> w = ops.expand_weight(cents, rows, channels_last=False)
    >>> w.shape, bool((w[0, 1] == 0).all())
    (torch.Size([2, 2, 3, 3]), True)
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

CSRC = Path(__file__).resolve().parent / "csrc"
# NOTE: -march=native: the kernels are built for the machine that runs them (AVX-512 where it has it)
_CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_module = None  # the compiled extension: a Python module (direct bindings) that registers the operators
_error: Optional[str] = None
_registered = False
_direct_calls = True
_direct = None  # the extension module while direct calls are on


# ----------------------------------------------------------------------------- building
def sources() -> List[Path]:
    """The C++ files the extension is compiled from (``kse/csrc/*.cpp``)."""
    return sorted(CSRC.glob("*.cpp"))


def build_name() -> str:
    """The extension's name: ``kse_ops_`` and a hash of the sources (headers included), the
    compiler flags, the torch version and the build's layout."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join(_CFLAGS + _LDFLAGS + [torch.__version__]).encode())
    digest.update(b"compiled from copies in the build folder")  # how the build is laid out (_copy_sources)
    return "kse_ops_" + digest.hexdigest()[:16]


def _copy_sources(folder: Path) -> List[Path]:
    """The sources, copied into the build folder (a file is written only where its content
    differs, so that ninja sees unchanged sources as unchanged).

    NOTE: compiled from there rather than from ``kse/csrc``: the build name is a hash of the
    content, and torch's JIT build would rebuild (and bump the name) whenever the same build is
    loaded from sources at another path, e.g. from two checkouts of the repository."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in sources() + sorted(CSRC.glob("*.h")):
        data, copy = path.read_bytes(), folder / path.name
        if not copy.is_file() or copy.read_bytes() != data:
            tmp = folder / f".{path.name}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, copy)  # processes building at once write the same bytes
        copies.append(copy)
    return copies


def _build():
    global _module, _error, _direct
    with _lock:
        if _module is not None or _error is not None:
            return _module
        if os.environ.get("KSE_NO_EXTENSION"):
            _error = "disabled by KSE_NO_EXTENSION"
            return None
        if not CSRC.is_dir() or not sources():
            _error = f"the C++ sources are missing ({CSRC})"
            return None
        import logging

        def no_cuda_note(record: logging.LogRecord) -> bool:  # irrelevant for a CPU-only build
            return "No CUDA runtime is found" not in record.getMessage()

        log = logging.getLogger("torch.utils.cpp_extension")
        log.addFilter(no_cuda_note)
        try:
            from torch.utils.cpp_extension import _get_build_directory, load

            name = build_name()
            folder = Path(_get_build_directory(name, False))
            files = _copy_sources(folder / "csrc")
            module = load(name=name, sources=[str(p) for p in files if p.suffix == ".cpp"],
                          extra_include_paths=[str(folder / "csrc")], build_directory=str(folder),
                          extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS, with_cuda=False, is_python_module=True,
                          verbose=False)
            _register()
            _module = module
            _direct = module if _direct_calls else None
        except Exception as exc:  # noqa: BLE001 - no compiler / ninja: the references remain
            _error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        finally:
            log.removeFilter(no_cuda_note)
        return _module


def load_library() -> bool:
    """Build (on first call) and load the extension, registering the ``kse::`` operators; whether
    it worked (:func:`build_error` says why not). A TorchScript file or an AOTInductor package
    with fused layers needs this before it is loaded."""
    return _module is not None or _build() is not None


def available() -> bool:
    """Whether the compiled operators are usable (builds them on first call)."""
    return load_library()


def loaded() -> bool:
    """Whether the extension is already loaded, or known not to build, in this process: calling
    :func:`available` then costs nothing."""
    return _module is not None or _error is not None


def build_error() -> Optional[str]:
    """Why the extension is unavailable (``None`` when it built)."""
    _build()
    return _error


def library_path() -> Optional[str]:
    """The compiled library (builds it on first call; ``None`` if it did not build): in a Python
    process that does not import kse, ``torch.ops.load_library(path)`` registers the operators
    (it is a Python extension: a process without Python cannot load it)."""
    module = _module if _module is not None else _build()
    return module.__file__ if module is not None else None


def set_direct_calls(enabled: bool) -> None:
    """Eager :func:`fused_conv` and :func:`expand_weight` calls go straight to their C++ kernels
    through Python bindings (the default: they skip the dispatcher's per-call cost, which shows at
    batch 1 and in a training step's once-per-layer W'), or with ``False`` through
    ``torch.ops.kse.*`` (then ``torch.profiler`` sees the ``fused_conv`` calls too). Tracing,
    compiling, exporting, dispatch modes and ``torch.func`` transforms always get the operators."""
    global _direct_calls, _direct
    _direct_calls = bool(enabled)
    _direct = _module if _direct_calls else None


def direct_calls() -> bool:
    """Whether eager calls use the direct bindings (:func:`set_direct_calls`)."""
    return _direct_calls


# ----------------------------------------------------------------------------- references
def fused_conv_reference(x: Tensor, kept: Tensor, cents: Tensor, offsets: Tensor, assign: Tensor, scale: Tensor,
                         bias: Tensor, chunks: Tensor, kh: int, kw: int, ph: int, pw: int, relu: bool) -> Tensor:
    """``kse::fused_conv`` with stock operations: W' from the centroids, one convolution of the
    kept channels, then the per-channel scale, bias and ReLU. ``offsets`` and ``chunks`` only
    organise the kernel's work and are not read."""
    weight = cents.reshape(-1, kh, kw)[assign.long()]  # [N, K, kh, kw]
    out = F.conv2d(x.index_select(1, kept), weight.to(x.dtype), None, 1, (ph, pw))
    out = out * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    return out.relu() if relu else out


def expand_weight_reference(cents: Tensor, rows: Tensor, channels_last: bool, disjoint: bool = False) -> Tensor:
    """``kse::expand_weight`` with stock operations (differentiable: autograd sums the kernel
    gradients of a centroid through ``index_select``'s backward)."""
    M, kh, kw = cents.shape
    table = F.pad(cents.reshape(M, kh * kw), (0, 0, 0, 1))  # row M: zeros, for rows[n, j] = -1
    r = rows.long()
    weight = table.index_select(0, torch.where(r < 0, M, r).reshape(-1)).view(*rows.shape, kh, kw)
    return weight.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def expand_weight_backward_reference(grad: Tensor, rows: Tensor, num_centroids: int, channels_last: bool,
                                     disjoint: bool = False) -> Tensor:
    """``kse::expand_weight_backward`` with stock operations: ``index_add`` of every kernel's
    gradient into its centroid's row (kernels with ``rows = -1`` into a dropped row M), summed in
    float32 for float16 / bfloat16 gradients."""
    N, J, kh, kw = grad.shape
    D = kh * kw
    r = rows.long()
    index = (torch.where(r < 0, num_centroids, r).unsqueeze(2) * D + torch.arange(D, device=r.device)).reshape(-1)
    sum_type = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
    total = grad.new_zeros((num_centroids + 1) * D, dtype=sum_type).index_add(0, index, grad.reshape(-1).to(sum_type))
    return total[:num_centroids * D].view(num_centroids, kh, kw).to(grad.dtype)


# ----------------------------------------------------------------------------- public functions
def _eager(x: Tensor) -> bool:
    """An eager call on a plain tensor, outside any trace, compile, export, dispatch mode or
    ``torch.func`` transform (``torch.compiler.is_compiling()`` first: compiling, it is all that
    is evaluated)."""
    return (not torch.compiler.is_compiling() and type(x) is Tensor and not torch._C._is_tracing()
            and not torch._C._len_torch_dispatch_stack() and not torch._C._are_functorch_transforms_active())


def fused_conv(x: Tensor, kept: Tensor, cents: Tensor, offsets: Tensor, assign: Tensor, scale: Tensor, bias: Tensor,
               chunks: Tensor, kh: int, kw: int, ph: int, pw: int, relu: bool) -> Tensor:
    """``kse::fused_conv`` (see the module's docstring); :func:`fused_conv_reference` where the
    extension is not built."""
    if _direct is not None and _eager(x):  # the per-call path of eager inference: kept short
        return _direct.fused_conv(x, kept, cents, offsets, assign, scale, bias, chunks, kh, kw, ph, pw, relu)
    if _module is None and _build() is None:
        return fused_conv_reference(x, kept, cents, offsets, assign, scale, bias, chunks, kh, kw, ph, pw, relu)
    if _direct is not None and _eager(x):  # built just now
        return _direct.fused_conv(x, kept, cents, offsets, assign, scale, bias, chunks, kh, kw, ph, pw, relu)
    return torch.ops.kse.fused_conv.default(x, kept, cents, offsets, assign, scale, bias, chunks, kh, kw, ph, pw, relu)


def expand_weight(cents: Tensor, rows: Tensor, channels_last: bool, disjoint: bool = False) -> Tensor:
    """``kse::expand_weight`` (see the module's docstring); :func:`expand_weight_reference` where
    the extension is not built."""
    if _direct is not None and _eager(cents):  # the per-call path of training steps: kept short
        return _direct.expand_weight(cents, rows, channels_last, disjoint)
    if _module is None and _build() is None:
        return expand_weight_reference(cents, rows, channels_last, disjoint)
    if _direct is not None and _eager(cents):
        return _direct.expand_weight(cents, rows, channels_last, disjoint)
    return torch.ops.kse.expand_weight.default(cents, rows, channels_last, disjoint)


def expand_weight_backward(grad: Tensor, rows: Tensor, num_centroids: int, channels_last: bool,
                           disjoint: bool = False) -> Tensor:
    """``kse::expand_weight_backward`` (see the module's docstring);
    :func:`expand_weight_backward_reference` where the extension is not built."""
    if _module is None and _build() is None:
        return expand_weight_backward_reference(grad, rows, num_centroids, channels_last, disjoint)
    return torch.ops.kse.expand_weight_backward.default(grad, rows, num_centroids, channels_last, disjoint)


# ----------------------------------------------------------------------------- fake kernels
def _fused_conv_fake(x, kept, cents, offsets, assign, scale, bias, chunks, kh, kw, ph, pw, relu):
    torch._check(x.dim() == 4 and x.dtype == torch.float32, lambda: "fused_conv: x must be float32 [B, C, H, W]")
    torch._check(kh >= 1 and kw >= 1 and ph >= 0 and pw >= 0,
                 lambda: "fused_conv: kernel sizes >= 1 and paddings >= 0 needed")
    torch._check(kept.dim() == 1 and kept.dtype == torch.int64, lambda: "fused_conv: kept must be int64 [K], K >= 1")
    torch._check(cents.dim() == 2 and cents.dtype == torch.float32,
                 lambda: "fused_conv: cents must be float32 [M, kh * kw]")
    torch._check(assign.dim() == 2 and assign.dtype == torch.int32, lambda: "fused_conv: assign must be int32 [N, K]")
    B, _, H, W = x.shape
    Ho, Wo = H + 2 * ph - kh + 1, W + 2 * pw - kw + 1
    torch._check(Ho > 0 and Wo > 0, lambda: "input smaller than the kernel")
    # as the kernel: a channels_last input of a same-size convolution answers channels_last
    nhwc = Ho == H and Wo == W and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty((B, assign.shape[0], Ho, Wo), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if nhwc else torch.contiguous_format)


def _weight_strides(J, kh, kw, channels_last):
    return (kh * kw * J, 1, kw * J, J) if channels_last else (J * kh * kw, kh * kw, kw, 1)


def _expand_weight_fake(cents, rows, channels_last, disjoint=False):
    torch._check(cents.dim() == 3, lambda: "expand_weight: cents must be [M, kh, kw] on the CPU")
    torch._check(rows.dim() == 2 and rows.dtype == torch.int32,
                 lambda: "expand_weight: rows must be a contiguous int32 [N, J] CPU tensor")
    N, J = rows.shape
    _, kh, kw = cents.shape
    return cents.new_empty_strided((N, J, kh, kw), _weight_strides(J, kh, kw, channels_last))


def _expand_weight_backward_fake(grad, rows, num_centroids, channels_last, disjoint=False):
    torch._check(rows.dim() == 2 and rows.dtype == torch.int32,
                 lambda: "expand_weight_backward: rows must be a contiguous int32 [N, J] CPU tensor")
    torch._check(grad.dim() == 4, lambda: "expand_weight_backward: grad must be a [N, J, kh, kw] CPU tensor")
    return grad.new_empty((num_centroids, grad.shape[2], grad.shape[3]))


_LIBRARY: Optional[torch.library.Library] = None


def _register() -> None:
    """The operators' fake kernels, once they exist (the extension registers their schemas)."""
    global _registered, _LIBRARY
    if _registered:
        return
    _LIBRARY = torch.library.Library("kse", "FRAGMENT")
    torch.library.register_fake("kse::fused_conv", _fused_conv_fake, lib=_LIBRARY)
    torch.library.register_fake("kse::expand_weight", _expand_weight_fake, lib=_LIBRARY)
    torch.library.register_fake("kse::expand_weight_backward", _expand_weight_backward_fake, lib=_LIBRARY)
    _registered = True


def _operators_exist() -> bool:
    try:
        torch.ops.kse.fused_conv.default
    except (AttributeError, RuntimeError):
        return False
    return True


# the library loaded by other means (torch.ops.load_library(library_path()) before this module was
# imported; torch imports it for the fake kernels, as the library's schemas say): register them now
if _operators_exist():
    _register()
