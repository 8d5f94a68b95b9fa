"""Export a model to a pt2 package, ONNX or TorchScript and verify the written file against eager PyTorch.

Every file is written under a temporary name, run on a batch the export never saw (the batch
axis stays dynamic), compared with the model's own outputs, and renamed into place only when
the largest difference, relative to the largest output magnitude, is within ``tolerance``::

    >>> import kse, kse.export
    >>> model = kse.load("runs/ft/model.kse")                             # doctest: +SKIP
    >>> manifest = kse.export.export_model(model, "runs/export", input_size=(3, 32, 32))  # doctest: +SKIP
    >>> manifest["exports"]["pt2"]["max_rel_diff"] <= 1e-4               # doctest: +SKIP
    True

Formats (:data:`FORMATS`; :data:`DEFAULT_FORMATS` are written unless told otherwise):

* ``"pt2"``: ``torch.export`` then AOTInductor (``torch._inductor.aoti_compile_and_package``),
  a package of compiled C++ that ``torch._inductor.aoti_load_package`` runs. It keeps the
  deployed forms, the compiled fused KSE operator ``kse::fused_conv`` included: the process
  that loads it needs that operator library first (``kse.ops.load_library()``, a Python
  extension; without fused layers libtorch's C++ loader runs it too).
* ``"onnx"``: the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``,
  which needs onnxscript), run with onnxruntime on CPU. KSE layers go in stock forms, since
  onnxruntime cannot run the compiled operator.
* ``"torchscript"``: ``torch.jit.trace``, reloaded with ``torch.jit.load``; keeps the compiled
  operator too. NOTE: TorchScript is deprecated in PyTorch; it stays for runtimes that need it.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

from .atomic import atomic_path, write_text

#: format name -> file name written in the output folder
FORMATS: Dict[str, str] = {"pt2": "model.pt2", "onnx": "model.onnx", "torchscript": "model.ts.pt"}
#: the formats written when none are named
DEFAULT_FORMATS = ("pt2", "onnx")
_LABELS = {"pt2": "pt2 (AOTInductor)", "onnx": "ONNX", "torchscript": "TorchScript"}
#: the progress line before each format's export
_STARTING = {"pt2": "pt2: torch.export, then AOTInductor compiles the model to C++ (a minute or more)",
             "onnx": "ONNX: the torch.export-based exporter, then a check with onnxruntime",
             "torchscript": "TorchScript: torch.jit.trace, then a check of the reloaded file"}
#: what a process must do before it runs a file with the compiled fused operator
OPERATOR_NOTE = ("the kse operator library: `import kse.ops; kse.ops.load_library()` before loading the file "
                 "(or torch.ops.load_library(kse.ops.library_path()))")

TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """An export that failed or whose file does not reproduce the model; nothing was written."""


def max_rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|``: the largest difference relative to the largest output."""
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")


def _batch_axis():
    """A dynamic batch axis for ``torch.export`` (and the exporters built on it)."""
    return ({0: torch.export.Dim("batch", min=1, max=1 << 20)},)


def _two_rows(example: torch.Tensor) -> torch.Tensor:
    """``example`` with at least two rows: torch.export specialises an axis of size 1 to a constant."""
    return example if len(example) > 1 else example.expand(2, *example.shape[1:]).clone()


class _CompileError(RuntimeError):
    """AOTInductor could not compile an exported program."""


def _pt2(model: nn.Module, target: str, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.export`` then AOTInductor into the package ``target``; the reloaded package."""
    example = _two_rows(example)
    program = torch.export.export(model, (example,), dynamic_shapes=_batch_axis())
    # file objects: torch takes a path for a package only if it ends with .pt2, the temporary one does not
    with open(target, "w+b") as f:
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=f)
        except Exception as exc:  # noqa: BLE001 - named as a compilation failure
            raise _CompileError(f"{type(exc).__name__}: {_first_line(exc)}") from exc
    with open(target, "rb") as f:
        return torch._inductor.aoti_load_package(f)


def _onnx(model: nn.Module, target: str, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``torch.export``-based ONNX exporter into ``target``; the file in an onnxruntime session."""
    import onnxruntime as ort

    example = _two_rows(example)
    # NOTE: weights inside the file (external_data=False): a separate data file would be named
    # after the temporary file, which is renamed afterwards
    torch.onnx.export(model, (example,), target, dynamo=True, external_data=False, verbose=False,
                      input_names=["input"], output_names=["logits"], dynamic_shapes=_batch_axis())
    session = ort.InferenceSession(target, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def _torchscript(model: nn.Module, target: str, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.jit.trace`` into ``target``; the reloaded file."""
    torch.jit.trace(model, example).save(target)
    return torch.jit.load(target)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def export_and_check(model: nn.Module, fmt: str, target: Union[str, Path], example: torch.Tensor,
                     check: torch.Tensor, ref: torch.Tensor) -> float:
    """Export ``model`` to ``target`` in ``fmt`` (traced on ``example``), run the file on
    ``check`` and on its first row alone, and return the largest relative difference to
    ``ref = model(check)`` and to the model's output on that row (``inf`` when the shapes
    differ). A failing export raises :class:`ExportError` with a one-line reason."""
    _check_format(fmt)
    target = str(target)
    exporter = {"pt2": _pt2, "onnx": _onnx, "torchscript": _torchscript}[fmt]
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            # inference: no backward graph is recorded; the exporters' progress lines are not ours
            warnings.simplefilter("ignore")
            run = exporter(model, target, example)
            pairs = [(run(check), ref), (run(check[:1]), ref[:1])]  # a batch of one too
    except _CompileError as exc:
        raise ExportError(f"{_LABELS[fmt]} export failed: AOTInductor could not compile the exported program "
                          f"({exc}); it needs a C++ compiler and a writable cache: install one, or pass "
                          "--format onnx or torchscript") from exc
    except Exception as exc:  # noqa: BLE001 - reported as one line
        raise ExportError(f"{_LABELS[fmt]} export failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    return max(max_rel_diff(got, want) if got.shape == want.shape else float("inf") for got, want in pairs)


def export_verified(model: nn.Module, fmt: str, target: Union[str, Path], example: torch.Tensor,
                    check: torch.Tensor, ref: torch.Tensor, tolerance: float = TOLERANCE) -> float:
    """:func:`export_and_check` through a temporary file renamed onto ``target`` only when the
    difference is at most ``tolerance``; otherwise :class:`ExportError` and no file is left."""
    with atomic_path(target) as tmp:
        diff = export_and_check(model, fmt, tmp, example, check, ref)
        if not diff <= tolerance:
            raise ExportError(f"{fmt} export does not match PyTorch: max relative difference {diff:.3g} > "
                              f"{tolerance:g} (nothing written)")
    return diff


def forms_for_format(forms: Dict[str, str], fmt: str, form: str = "auto") -> Dict[str, str]:
    """The form each KSE layer gets in ``fmt``: the deployed ``forms`` for pt2 and TorchScript
    (the compiled kernel included); for ONNX ``"full"`` under ``form="auto"``, else the forms
    with the compiled kernel replaced by ``"full"``.

    NOTE: onnxruntime cannot run the compiled kernel, and runs the channel gather of ``"dense"``
    slowly (forms measured in PyTorch say nothing of it): zero kernels for the dropped channels.
    """
    from .forms import without_fused

    if fmt != "onnx":
        return dict(forms)
    return {n: "full" if form == "auto" else without_fused(f, "full") for n, f in forms.items()}


def _kse_layers(model: nn.Module) -> Dict[str, nn.Module]:
    from .conv import KSEConv2d

    return {n: m for n, m in model.named_modules() if isinstance(m, KSEConv2d)}


def export_model(model: nn.Module, out_dir: Union[str, Path], formats: Sequence[str] = DEFAULT_FORMATS, *,
                 input_size: Sequence[int], batch_size: int = 1, forms: Optional[Dict[str, str]] = None,
                 form: str = "auto", fold: bool = True,
                 tolerance: float = TOLERANCE, header: Optional[Dict[str, Any]] = None,
                 on_note: Optional[Callable[[str], None]] = None,
                 on_written: Optional[Callable[[str, Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Export ``model`` (its KSE layers already in their inference forms, e.g. by
    ``kse.deploy_``) to ``out_dir/model.pt2``, ``out_dir/model.onnx`` and/or
    ``out_dir/model.ts.pt``, each verified against eager PyTorch, and write the manifest
    ``out_dir/export.json``.

    Args:
        formats: names from :data:`FORMATS`, in the order to write them.
        input_size: ``(C, H, W)``; the trace runs at ``batch_size`` (pt2 and ONNX: at least 2),
            the check at ``batch_size + 2``. A layer deployed with a form per batch size gets
            the form of ``batch_size`` (one graph serves every batch size).
        forms: the KSE layers' deployed forms, as ``kse.deploy_`` returns them (default: each
            layer's current form).
        form: the form the layers were deployed with (``"auto"`` or one form); decides what
            ONNX gets (:func:`forms_for_format`).
        fold: fold each BatchNorm into the convolution before it (``kse.fold_batchnorm``); a
            model that cannot be folded is exported unfolded, with a note.
        header: entries put first in the manifest (e.g. ``{"checkpoint": path}``).
        on_note: called with a one-line note (BatchNorm not folded) or progress line (a format's
            export starts).
        on_written: called as ``on_written(fmt, entry)`` after each verified file, ``entry``
            holding ``file``, ``max_rel_diff``, ``forms``, ``check_batch``.

    Returns the manifest. Raises :class:`ExportError` when a format fails or does not match
    (that file is not written), ``ValueError`` for an unknown format or a bad size.
    """
    formats = list(dict.fromkeys(formats))
    for fmt in formats:
        _check_format(fmt)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    input_size = tuple(int(s) for s in input_size)
    layers = _kse_layers(model)
    forms = dict(forms) if forms is not None else {n: m.form for n, m in layers.items()}
    model.eval()
    exported, folded = model, False
    if fold:
        from .fold import fold_batchnorm

        try:  # the check below compares the folded model's files with the unfolded model's outputs
            exported, folded = fold_batchnorm(model), True
            layers = _kse_layers(exported)
        except ValueError as exc:
            if on_note:
                on_note(f"note: BatchNorm not folded ({exc})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # a manifest describes the files of one call: an old one goes before any file is replaced
    (out / "export.json").unlink(missing_ok=True)
    gen = torch.Generator().manual_seed(0)
    # the trace runs at batch_size: TorchScript keeps the forms chosen for it
    example = torch.randn(batch_size, *input_size, generator=gen)
    check = torch.randn(batch_size + 2, *input_size, generator=gen)  # the batch axis must stay dynamic
    with torch.no_grad():
        ref = model(check)
    verified: Dict[str, Dict[str, Any]] = {}
    for fmt in formats:
        target = out / FORMATS[fmt]
        for n, f in forms_for_format(forms, fmt, form).items():
            layers[n].set_form(f)
            if fmt != "torchscript":  # a trace at batch_size keeps that size's forms by itself
                layers[n].set_form(layers[n].form_for_batch(batch_size))
        if on_note:
            on_note(_STARTING[fmt])
        diff = export_verified(exported, fmt, target, example, check, ref, tolerance)
        ran = dict(Counter(m.form_for_batch(batch_size) for m in layers.values()))
        verified[fmt] = {"file": str(target), "max_rel_diff": diff, "forms": ran}
        if on_written:
            on_written(fmt, {**verified[fmt], "check_batch": len(check)})
    manifest = {**(header or {}), "arch": (getattr(model, "kse_arch", None) or {}).get("name"),
                "input_size": list(input_size), "preprocess": getattr(model, "kse_preprocess", None),
                "forms": dict(Counter(forms.values())), "tolerance": tolerance, "batch_size": batch_size,
                "batchnorm_folded": folded, "exports": verified, "input_name": "input", "output_name": "logits"}
    for fmt in ("pt2", "torchscript"):
        if "fused" in verified.get(fmt, {}).get("forms", {}):
            manifest[f"{fmt}_needs"] = OPERATOR_NOTE
    write_text(out / "export.json", json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest
