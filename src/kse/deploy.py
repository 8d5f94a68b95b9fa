"""``deploy_``: put every KSE layer in its fastest inference form, measured on this machine.

Without it a KSE layer in eval mode already runs a cached dense weight (see :mod:`kse.forms`:
``"full"``, or ``"dense"`` where it reads at most two thirds of its input channels), never
slower than the convolution it replaced. ``deploy_`` chooses among all the forms of
:mod:`kse.forms` (outputs equal the training form within 1e-5 relative):

* ``"dense"``: the clustered weight ``Tensor[N, C_kept, kh, kw]``, one dense convolution of the
  kept input channels (oneDNN / cuDNN do the work);
* ``"full"``: the same weight zero-filled over all input channels (no gather of the input, the
  cost of the original conv: the safe choice where the gather costs more than it saves);
* ``"split"``: the paper's deployment (KSE Sec. 3.5, Fig. 2): each kept input map is convolved
  with its q_c centroids (a grouped convolution per centroid-count bucket), then the output
  channels are fused by summing the maps of their assigned centroids;
* ``"fused"``: the same computation as ``"split"`` in one compiled CPU kernel (:mod:`kse.fused`),
  considered by ``"auto"`` only when asked for (``candidates``).

With ``form="auto"`` each layer is timed in every form on the current device, on an input of
its real shape (recorded by a forward pass at the model's input size: ``input_size``, else the
one its file or its ``KSEConfig`` records), and the fastest is kept; candidates whose memory
(prepared tensors and intermediate maps, estimated before anything is built) exceeds
``memory_factor`` times the full form's, and 64 MiB, are skipped. The choice is stored in
``layer.form`` and saved with the model, so loading does not measure again.

Example::

    >>> import torch, kse
    >>> from kse.models import get_model
    >>> net = kse.compress(get_model("resnet20").eval(), kse.KSEConfig(G=4, input_size=(3, 32, 32)))
    >>> forms = kse.deploy_(net)   # measured at the KSEConfig's input size
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from . import forms, fused
from .conv import KSEConv2d
from .forms import FORMS, INFERENCE_FORMS, batch_form, parse_form, without_fused
from .module_utils import capture_layer_inputs, eval_mode
from .timing import time_call

# deploy_(form="auto") skips a candidate estimated to need more than memory_factor times the
# full form's memory, unless it needs less than this
MIN_CANDIDATE_BYTES = 64 << 20


def known_input_size(model: nn.Module) -> Optional[Tuple[int, int, int]]:
    """The ``(C, H, W)`` the model is known to take: from the preprocessing its file records
    (``model.kse_preprocess``), else from the ``KSEConfig`` it was compressed with
    (``model.kse_config``); ``None`` if neither says. A recorded size that is not three
    positive integers is a ``ValueError``."""
    for record in (getattr(model, "kse_preprocess", None), getattr(model, "kse_config", None)):
        size = record.get("input_size") if isinstance(record, dict) else None
        if size is not None:
            if (not isinstance(size, (list, tuple)) or len(size) != 3
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)):
                raise ValueError(f"the recorded input size is not three positive integers (C, H, W): {size!r}")
            return tuple(size)
    return None


def candidate_fits(layer: KSEConv2d, form: str, shape: Sequence[int], memory_factor: float) -> bool:
    """Whether ``form``'s estimated memory on an input of ``shape`` stays within
    ``memory_factor`` times the full form's (the original convolution's weight and output) or
    :data:`MIN_CANDIDATE_BYTES`."""
    need = forms.REGISTRY[form].memory(layer, shape)
    return need <= max(memory_factor * forms.REGISTRY["full"].memory(layer, shape), MIN_CANDIDATE_BYTES)


def model_is_channels_last(model: nn.Module) -> bool:
    """Whether the model's first 4-D convolution weight is laid out channels_last."""
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Conv2d) and isinstance(w, Tensor) and w.dim() == 4:
            return not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
    return False


def deploy_(model: nn.Module, form: str = "auto", input_size: Optional[Sequence[int]] = None,
            batch_size: Union[int, Sequence[int]] = 1, repeats: int = 5, candidates: Sequence[str] = INFERENCE_FORMS,
            per_batch: bool = True, channels_last: Optional[bool] = None,
            memory_factor: float = 4.0) -> Dict[str, str]:
    """Switch every KSE layer of ``model`` to an inference form, in place.

    Args:
        form: ``"auto"`` (measure), ``"dense"``, ``"full"``, ``"split"``, ``"fused"`` (layers the
            kernel does not support get ``"dense"``), a form per batch size such as
            ``"fused@1,full@64"`` (see :meth:`KSEConv2d.set_form`), or ``"train"`` (undo).
        input_size: ``(C, H, W)`` for the measuring pass (default: :func:`known_input_size`, the
            size the model's file or ``KSEConfig`` records; an error names how to give it
            where neither does).
        batch_size: batch size used when measuring, or several: each layer then gets the best
            form at each of them (a form per batch size, ``"fused@1,full@64"``, when they differ;
            inputs run in the form of the nearest measured size), or with ``per_batch=False``
            the one form with the smallest sum over them of its time relative to the best.
        candidates: the forms ``"auto"`` measures; add ``"fused"`` to include the compiled
            kernel (built on first use; layers it does not support skip it, and get "dense"
            when it is the only candidate).
        channels_last: give the measuring pass its input in that memory format (default: the
            model's, channels_last when its first 4-D convolution weight is, as after
            ``model.to(memory_format=torch.channels_last)``; the layers after a channels_last
            convolution get channels_last inputs anyway). The fastest form differs between the
            two layouts; the fused kernel reads and writes either.
        memory_factor: ``"auto"`` builds no candidate whose estimated memory (prepared tensors
            and intermediate maps at the measured input) exceeds this many times the full
            form's, or :data:`MIN_CANDIDATE_BYTES` (e.g. the split form of a wide 1x1 layer, whose
            centroid maps outnumber the output channels by the input channels).
    Returns:
        ``{layer name: chosen form}``.
    """
    if form != "auto":
        parse_form(form)  # ValueError naming the accepted spellings
    if not memory_factor >= 1:
        raise ValueError(f"memory_factor must be a number >= 1, got {memory_factor!r}")
    bad = [f for f in candidates if f not in FORMS or f == "train"]
    if bad or not candidates:
        raise ValueError(f"candidates must be inference forms from {FORMS[1:]}, got {list(candidates)!r}")
    use_fused = "fused" in candidates and fused.available()  # built once here, not inside the timing loop
    layers = {n: m for n, m in model.named_modules() if isinstance(m, KSEConv2d)}
    if not layers:
        raise ValueError("the model has no KSE layer to deploy; run kse.compress_ first")
    if form != "auto":
        chosen = {}
        for n, m in layers.items():
            # e.g. stride 2: the kernel does not apply, such layers get the dense form
            chosen[n] = m.set_form(form if "fused" not in form or fused.supports(m) else without_fused(form)).form
        return chosen

    if input_size is None:
        input_size = known_input_size(model)
        if input_size is None:
            raise ValueError("deploy_(form='auto') measures the layers on an input of the model's size, which is not "
                             "recorded on this model: pass input_size=(C, H, W) (one image, e.g. (3, 224, 224)), or "
                             "set model.kse_preprocess = {'input_size': [C, H, W]} (kse.save keeps it), or choose a "
                             "form without measuring, e.g. form='full'")
    p = next(model.parameters())
    if channels_last is None:
        channels_last = model_is_channels_last(model)
    batches = (batch_size,) if isinstance(batch_size, int) else tuple(batch_size)
    if not batches or not all(isinstance(b, int) and b >= 1 for b in batches) or len(set(batches)) < len(batches):
        raise ValueError(f"batch_size must be a positive integer or a sequence of distinct ones, got {batch_size!r}")
    before = {n: m.form for n, m in layers.items()}
    chosen = {}
    # per layer and form, the time relative to the layer's best form, summed over the batch sizes:
    # the choice that is never far from the best at any of them (a gather that pays at batch 1
    # can cost more than it saves at batch 64)
    scores: Dict[str, Dict[str, float]] = {n: {} for n in layers}
    best_at: Dict[str, list] = {n: [] for n in layers}  # (batch size, fastest form there)
    try:
        for b in batches:
            x = torch.randn(b, *input_size, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            inputs = capture_layer_inputs(model, list(layers), x)
            with eval_mode(model), torch.no_grad():
                missing = [n for n in layers if n not in inputs]
                if missing:
                    raise ValueError(f"KSE layers {missing} did not run on an input of size {tuple(input_size)}; "
                                     "pass the input_size the model expects, or deploy them with an explicit form")
                for name, m in layers.items():
                    timings = {}
                    shape = tuple(inputs[name].shape)
                    usable = [f for f in candidates if (f != "fused" or (use_fused and fused.supports(m)))
                              and candidate_fits(m, f, shape, memory_factor)]
                    for f in usable or ["dense"]:  # only "fused" asked for, and it does not apply here
                        m.set_form(f)
                        timings[f] = time_call(m, inputs[name], warmup=1, repeats=repeats)["min_ms"]
                    best_at[name].append((b, min(timings, key=timings.get)))
                    best = max(min(timings.values()), 1e-9)
                    for f, t in timings.items():
                        scores[name][f] = scores[name].get(f, 0.0) + t / best
            del inputs
        for name, m in layers.items():
            chosen[name] = (batch_form(best_at[name]) if per_batch and len(batches) > 1
                            else min(scores[name], key=scores[name].get))
            m.set_form(chosen[name])
    except BaseException:
        for n, m in layers.items():
            m.set_form(before[n])
        raise
    return chosen
