"""``deploy_``: put every KSE layer in its fastest inference form.

Forms of a :class:`~kse.conv.KSEConv2d` (outputs equal the training form within 1e-5 relative):

* ``"dense"``: the clustered weight ``Tensor[N, C_kept, kh, kw]`` is built once and run as a
  dense convolution over the kept input channels (oneDNN / cuDNN do the work);
* ``"full"``: the same weight zero-filled over all input channels (no gather of the input, the
  cost of the original conv: the safe choice where the gather costs more than it saves);
* ``"fused"``: the same computation as ``"split"`` in one compiled CPU kernel (:mod:`kse.fused`),
  considered by ``"auto"`` only when asked for (``candidates``);
* ``"split"``: the paper's deployment (KSE.md §7, Fig. 2): each kept input map is convolved
  with its q_c centroids (a grouped convolution per centroid-count bucket), then the output
  channels are fused by summing the maps of their assigned centroids.

With ``form="auto"`` each layer is timed in every form on the current device, on an input of
its real shape (recorded by a forward pass), and the faster one is kept; the choice is stored
in ``layer.form`` and saved with the model, so loading does not measure again.

Example::

    >>> import torch, kse
    >>> from kse.models import get_model
    >>> net = kse.compress(get_model("resnet20").eval(), kse.KSEConfig(G=4))
    >>> forms = kse.deploy_(net, form="dense")
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from .conv import FORMS, INFERENCE_FORMS, KSEConv2d, batch_form, parse_form, without_fused
from .modules import capture_layer_inputs, eval_mode
from .timing import time_call


def model_is_channels_last(model: nn.Module) -> bool:
    """Whether the model's first 4-D convolution weight is laid out channels_last."""
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Conv2d) and isinstance(w, Tensor) and w.dim() == 4:
            return not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
    return False


def deploy_(model: nn.Module, form: str = "auto", input_size: Optional[Sequence[int]] = None,
            batch_size: Union[int, Sequence[int]] = 1, repeats: int = 5, candidates: Sequence[str] = INFERENCE_FORMS,
            per_batch: bool = True, channels_last: Optional[bool] = None) -> Dict[str, str]:
    """Switch every KSE layer of ``model`` to an inference form, in place.

    Args:
        form: ``"auto"`` (measure), ``"dense"``, ``"full"``, ``"split"``, ``"fused"`` (layers the
            kernel does not support get ``"dense"``), a form per batch size such as
            ``"fused@1,full@64"`` (see :meth:`KSEConv2d.set_form`), or ``"train"`` (undo).
        input_size: ``(C, H, W)`` for the measuring pass (default: the model's preprocessing).
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
    Returns:
        ``{layer name: chosen form}``.
    """
    if form != "auto":
        parse_form(form)  # ValueError naming the accepted spellings
    bad = [f for f in candidates if f not in FORMS or f == "train"]
    if bad or not candidates:
        raise ValueError(f"candidates must be inference forms from {FORMS[1:]}, got {list(candidates)!r}")
    from . import fused

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
        pre = getattr(model, "kse_preprocess", None) or {}
        if "input_size" not in pre:
            raise ValueError("deploy_(form='auto') needs input_size=(C, H, W) to measure the layers")
        input_size = pre["input_size"]
    p = next(model.parameters())
    if channels_last is None:
        channels_last = model_is_channels_last(model)
    batches = (batch_size,) if isinstance(batch_size, int) else tuple(batch_size)
    if not batches or not all(isinstance(b, int) and b >= 1 for b in batches) or len(set(batches)) < len(batches):
        raise ValueError(f"batch_size must be a positive integer or a sequence of distinct ones, got {batch_size!r}")
    forms = {n: m.form for n, m in layers.items()}
    chosen = {}
    # per layer and form, the time relative to the layer's best form, summed over the batch sizes:
    # the choice that is never far from the best at any of them (a gather that pays at batch 1
    # can cost more than it saves at batch 64)
    scores: Dict[str, Dict[str, float]] = {n: {} for n in layers}
    best_at: Dict[str, list] = {n: [] for n in layers}  # (batch size, fastest form there)
    try:
        for b in batches:
            for m in layers.values():
                m.set_form("dense")
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
                    usable = [f for f in candidates if f != "fused" or (use_fused and fused.supports(m))]
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
            m.set_form(forms[n])
        raise
    return chosen
