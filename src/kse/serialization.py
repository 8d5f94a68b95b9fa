"""The ``.kse`` file: safetensors tensors + JSON structure, no pickle.

``kse.save(model, path)`` writes any model of the registry (:mod:`kse.models`), dense,
KSE-compressed, or with channel widths changed (dead-channel removal, filter pruning):

* tensors: the state dict, except that each KSE layer's assignment is stored as packed
  indices (``ceil(log2 q_c)`` bits per kernel, KSE Sec. 3.5; none for ``q_c = 1`` or a
  channel kept whole);
* metadata ``"kse"`` (JSON): format version, architecture name and arguments, the KSE
  config, every conv / BatchNorm / Linear shape that differs from the freshly built
  architecture, every KSE layer's structure (kept channels, centroid counts, index bit
  widths, inference form), the module versions of the state dict, the input preprocessing
  the model expects, free ``extra``, and a SHA-256 checksum of all of it.

``kse.load(path)`` checks the file before it builds anything (see :func:`load`), rebuilds the
architecture, reshapes what was reshaped, swaps the KSE layers in and loads the tensors: the
caller rebuilds nothing by hand.

Example::

    >>> import kse, torch
    >>> from kse.models import get_model
    >>> net = get_model("resnet20").eval()
    >>> kse.save(net, "/tmp/r20.kse")
    >>> torch.equal(kse.load("/tmp/r20.kse")(torch.ones(1, 3, 32, 32)), net(torch.ones(1, 3, 32, 32)))
    True
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from torch.overrides import TorchFunctionMode

from .atomic import save_safetensors
from .conv import KSEConv2d
from .forms import parse_form, without_fused
from .kmeans import centroid_offsets
from .module_utils import check_has_values, set_module

FORMAT = "kse"
# 1: the first format; 2: adds "checksum" (always verified) and "module_versions"
FORMAT_VERSION = 2
_RESHAPED = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_SIZE_LIMIT = 2**31 - 1  # any channel count, kernel size, stride, class count, architecture integer
_INPUT_DIM_LIMIT = 2**16  # each of C, H, W in preprocess.input_size
_INPUT_NUMEL_LIMIT = 2**28  # C * H * W: one float32 image of at most 1 GiB


class CheckpointError(ValueError):
    """A file that is not a readable KSE checkpoint."""


class _Malformed(Exception):
    """One malformed value of the metadata (made a :class:`CheckpointError` by the caller)."""


# ----------------------------------------------------------------------------- index packing
def local_assignment(layer: KSEConv2d) -> torch.Tensor:
    """``LongTensor[C_kept, N]``: each kernel's centroid index within its own channel,
    ``assignment[j, n] - sum_{i<j} q_i`` (what :func:`pack_indices` stores)."""
    return layer.assignment - centroid_offsets(layer.centroid_counts).unsqueeze(1)


def index_bit_widths(layer: KSEConv2d) -> list:
    """Bits per stored index, per kept channel (KSE Sec. 3.5): ``ceil(log2 q_c)``; 0 when
    ``q_c = 1``, or when a channel kept whole (``q_c = N``) maps kernel n to centroid n."""
    local = local_assignment(layer)
    identity = torch.arange(layer.out_channels, device=local.device)
    return [0 if q == 1 or (q == layer.out_channels and torch.equal(local[j], identity)) else math.ceil(math.log2(q))
            for j, q in enumerate(layer.centroid_counts.tolist())]


def pack_indices(local: torch.Tensor, widths: list) -> torch.Tensor:
    """Pack ``local: LongTensor[K, N]`` row j with ``widths[j]`` bits per value (LSB first)."""
    bits = []
    values = local.cpu().numpy()
    for j, b in enumerate(widths):
        if b:
            bits.append(((values[j][:, None] >> np.arange(b)) & 1).astype(np.uint8).reshape(-1))
    flat = np.concatenate(bits) if bits else np.zeros(0, dtype=np.uint8)
    return torch.from_numpy(np.packbits(flat, bitorder="little").copy())


def packed_size(widths: list, out_channels: int) -> int:
    """Bytes :func:`pack_indices` writes for ``widths`` and ``out_channels`` kernels per channel."""
    return -(-sum(widths) * out_channels // 8)


def unpack_indices(packed: torch.Tensor, widths: list, counts: list, out_channels: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`; channels stored with 0 bits get 0 (q = 1) or identity.

    ``packed`` must be the ``uint8`` tensor of exactly :func:`packed_size` bytes, and every
    index must fall in ``[0, counts[j])``; otherwise :class:`CheckpointError`."""
    if len(widths) != len(counts):
        raise CheckpointError(f"{len(widths)} index widths for {len(counts)} kept channels")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise CheckpointError(f"packed indices must be a 1-D uint8 tensor, got {packed.dtype} of shape "
                              f"{tuple(packed.shape)}")
    if any(not 0 <= b <= 31 for b in widths):
        raise CheckpointError(f"index widths must be in [0, 31] bits, got {sorted(set(widths))}")
    expected = packed_size(widths, out_channels)
    if packed.numel() != expected:
        raise CheckpointError(f"packed indices hold {packed.numel()} bytes, expected {expected}")
    flat = np.unpackbits(packed.numpy(), bitorder="little")
    local = torch.empty(len(widths), out_channels, dtype=torch.long)
    pos = 0
    for j, (b, q) in enumerate(zip(widths, counts)):
        if b == 0:
            local[j] = 0 if q == 1 else torch.arange(out_channels)
            continue
        chunk = flat[pos:pos + b * out_channels].reshape(out_channels, b).astype(np.int64)
        local[j] = torch.from_numpy((chunk << np.arange(b)).sum(1))
        pos += b * out_channels
    if len(counts) and ((local < 0).any() or (local >= torch.tensor(counts).unsqueeze(1)).any()):
        raise CheckpointError("packed indices point past their channel's centroids (corrupt file)")
    return local


def index_width(count: int, out_channels: int, identity: bool) -> int:
    """Bits per stored index of a channel with ``count`` centroids: ``ceil(log2 q)``, and 0 for
    ``q = 1`` or a channel kept whole whose kernel n uses centroid n (``identity``)."""
    return 0 if count == 1 or (identity and count == out_channels) else (count - 1).bit_length()


# ----------------------------------------------------------------------------- structure
def _module_spec(m: nn.Module) -> Dict[str, Any]:
    if type(m) is nn.Conv2d:
        return {"type": "Conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": list(m.kernel_size), "stride": list(m.stride),
                "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
                "padding_mode": m.padding_mode}
    if type(m) is nn.BatchNorm2d:
        return {"type": "BatchNorm2d", "num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
                "affine": m.affine, "track_running_stats": m.track_running_stats}
    if type(m) is nn.Linear:
        return {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None}
    if type(m) is KSEConv2d:
        return {"type": "KSEConv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": list(m.kernel_size), "stride": list(m.stride),
                "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                "dilation": list(m.dilation), "bias": m.bias is not None,
                "kept": m.kept_channels.tolist(), "counts": m.centroid_counts.tolist(),
                "index_bits": index_bit_widths(m), "form": m.form}
    raise TypeError(f"cannot describe a {type(m).__name__}")


def _build_module(spec: Dict[str, Any]) -> nn.Module:
    t = spec["type"]
    if t == "Conv2d":
        return nn.Conv2d(spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]), tuple(spec["stride"]),
                         spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"]),
                         tuple(spec["dilation"]), spec["groups"], spec["bias"], spec["padding_mode"])
    if t == "BatchNorm2d":
        return nn.BatchNorm2d(spec["num_features"], spec["eps"], spec["momentum"], spec["affine"],
                              spec["track_running_stats"])
    if t == "Linear":
        return nn.Linear(spec["in_features"], spec["out_features"], spec["bias"])
    if t == "KSEConv2d":
        return KSEConv2d(spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]), tuple(spec["stride"]),
                         spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"]),
                         tuple(spec["dilation"]), spec["bias"], torch.tensor(spec["kept"], dtype=torch.long),
                         torch.tensor(spec["counts"], dtype=torch.long))
    raise CheckpointError(f"unknown module type {t!r} in checkpoint")


# ----------------------------------------------------------------------------- architecture arguments
# Builder arguments that fetch or read something (pretrained weights, a URL, a file) are never
# written to or taken from a file: the file holds the weights, and loading must not download or
# unpickle anything. Such a key may only be null or false.
_FETCHING_WORDS = {"weights", "pretrained", "progress", "url", "path", "file", "checkpoint", "hub", "download", "dir",
                   "cache", "hf"}
# attributes that torchvision's builders set from the weights (googlenet, inception_v3): kept
# as explicit arguments when the weights argument is dropped
_SET_BY_WEIGHTS = ("transform_input", "aux_logits")


def _fetching_key(key: str) -> bool:
    return bool(_FETCHING_WORDS.intersection(re.split(r"[_\W]+", key.lower())))


def _check_arg_value(value: Any, what: str, depth: int = 0) -> None:
    """A JSON value a model builder may take: null, a boolean, a bounded integer, a finite
    number, a short string that is not a URL, or a list of these."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > _SIZE_LIMIT:
            raise _Malformed(f"{what} must be an integer of at most {_SIZE_LIMIT} in size, got {_short(value)}")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Malformed(f"{what} must be a finite number, got {value!r}")
        return
    if isinstance(value, str):
        if len(value) > 256 or "://" in value:
            raise _Malformed(f"{what} must be a short string (not a URL), got {_short(value)}")
        return
    if isinstance(value, list) and depth < 2 and len(value) <= 4096:
        for i, v in enumerate(value):
            _check_arg_value(v, f"{what}[{i}]", depth + 1)
        return
    raise _Malformed(f"{what} must be null, true/false, a number, a short string or a short list of these, "
                     f"got {_short(value)}")


def check_arch(arch: Any) -> Dict[str, Any]:
    """``{"name": str, "kwargs": {...}}`` with only plain builder arguments; raises ``ValueError``
    naming the first argument that would fetch or read something (pretrained weights, a URL,
    a file) or that is not a plain JSON value."""
    try:
        _check_arch(arch)
    except _Malformed as exc:
        raise ValueError(str(exc)) from None
    return arch


def _check_arch(arch: Any) -> None:
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise _Malformed("'arch' must be an object with a 'name'")
    kwargs = arch.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise _Malformed("'arch.kwargs' must be an object")
    for key, value in kwargs.items():
        if _fetching_key(key) and value not in (None, False):
            raise _Malformed(f"'arch.kwargs.{key}' = {_short(value)} would fetch or read data while building the "
                             "model (pretrained weights, a URL or a file); kse files hold their weights and "
                             "never load anything else: remove the argument")
        _check_arg_value(value, f"'arch.kwargs.{key}'")
    for key in ("num_classes", "in_channels"):
        if key in kwargs:
            _check_int(kwargs[key], f"'arch.kwargs.{key}'", 1)


def _arch_to_save(model: nn.Module, arch: Dict[str, Any]) -> Dict[str, Any]:
    """``arch`` without arguments that fetch (e.g. torchvision's ``weights=``): the weights are
    in the file. The attributes such an argument sets on the model (``transform_input``,
    ``aux_logits``) become explicit arguments."""
    if not isinstance(arch, dict) or not isinstance(arch.get("kwargs", {}), dict):
        return arch
    kwargs = dict(arch.get("kwargs", {}))
    dropped = [k for k, v in kwargs.items() if _fetching_key(k) and v not in (None, False)]
    if not dropped:
        return arch
    for key in dropped:
        del kwargs[key]
    for attr in _SET_BY_WEIGHTS:
        if isinstance(getattr(model, attr, None), bool):
            kwargs[attr] = getattr(model, attr)
    return {**arch, "kwargs": kwargs}


# ----------------------------------------------------------------------------- metadata checks
def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_int(value: Any, what: str, low: int = 0, high: int = _SIZE_LIMIT) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _Malformed(f"{what} must be an integer in [{low}, {high}], got {_short(value)}")
    return value


def _check_bool(value: Any, what: str) -> None:
    if not isinstance(value, bool):
        raise _Malformed(f"{what} must be true or false, got {_short(value)}")


def _check_pair(value: Any, what: str, low: int) -> None:
    if not isinstance(value, list) or len(value) != 2:
        raise _Malformed(f"{what} must be a list of 2 integers, got {_short(value)}")
    for v in value:
        _check_int(v, what, low)


def _check_number(value: Any, what: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value < low or (low_open and value == low) or value > high):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise _Malformed(f"{what} must be a finite number in {bounds}, got {_short(value)}")


def _check_keys(spec: Dict[str, Any], keys: tuple) -> None:
    missing = [k for k in keys if k not in spec]
    if missing:
        raise _Malformed(f"{', '.join(missing)}: missing")


def _check_conv_geometry(spec: Dict[str, Any]) -> None:
    _check_int(spec["in_channels"], "in_channels", 1)
    _check_int(spec["out_channels"], "out_channels", 1)
    _check_pair(spec["kernel_size"], "kernel_size", 1)
    _check_pair(spec["stride"], "stride", 1)
    _check_pair(spec["dilation"], "dilation", 1)
    padding = spec["padding"]
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise _Malformed(f"padding must be 'same', 'valid' or a list of 2 integers, got {_short(padding)}")
        if padding == "same" and spec["stride"] != [1, 1]:
            raise _Malformed(f"padding 'same' needs stride [1, 1], got {spec['stride']}")
    else:
        _check_pair(padding, "padding", 0)
    _check_bool(spec["bias"], "bias")


def _check_spec(spec: Dict[str, Any]) -> None:
    """Every field of one module description: types, ranges, and for a KSE layer the agreement
    of kept channels, centroid counts and index widths."""
    t = spec["type"]
    if t == "Conv2d":
        _check_keys(spec, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                           "bias", "padding_mode"))
        _check_conv_geometry(spec)
        groups = _check_int(spec["groups"], "groups", 1)
        if spec["in_channels"] % groups or spec["out_channels"] % groups:
            raise _Malformed(f"groups {groups} must divide in_channels {spec['in_channels']} and out_channels "
                             f"{spec['out_channels']}")
        if spec["padding_mode"] not in _PADDING_MODES:
            raise _Malformed(f"padding_mode must be one of {_PADDING_MODES}, got {_short(spec['padding_mode'])}")
    elif t == "BatchNorm2d":
        _check_keys(spec, ("num_features", "eps", "momentum", "affine", "track_running_stats"))
        _check_int(spec["num_features"], "num_features", 1)
        _check_number(spec["eps"], "eps", 0, low_open=True)
        if spec["momentum"] is not None:
            _check_number(spec["momentum"], "momentum", 0, 1)
        _check_bool(spec["affine"], "affine")
        _check_bool(spec["track_running_stats"], "track_running_stats")
    elif t == "Linear":
        _check_keys(spec, ("in_features", "out_features", "bias"))
        _check_int(spec["in_features"], "in_features", 1)
        _check_int(spec["out_features"], "out_features", 1)
        _check_bool(spec["bias"], "bias")
    elif t == "KSEConv2d":
        _check_keys(spec, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "bias",
                           "kept", "counts", "index_bits"))
        _check_conv_geometry(spec)
        n_in, n_out = spec["in_channels"], spec["out_channels"]
        kept, counts, bits = spec["kept"], spec["counts"], spec["index_bits"]
        for name, values in (("kept", kept), ("counts", counts), ("index_bits", bits)):
            if not isinstance(values, list):
                raise _Malformed(f"{name} must be a list of integers, got {_short(values)}")
        if len(kept) > n_in:
            raise _Malformed(f"kept lists {len(kept)} channels, more than in_channels {n_in}")
        for name, values in (("counts", counts), ("index_bits", bits)):
            if len(values) != len(kept):
                raise _Malformed(f"{name} has {len(values)} values for {len(kept)} kept channels")
        for c in kept:
            _check_int(c, "kept", 0, n_in - 1)
        if any(b <= a for a, b in zip(kept, kept[1:])):
            raise _Malformed("kept must list distinct input channels in increasing order")
        for q in counts:
            _check_int(q, "counts", 1, n_out)
        for j, (q, b) in enumerate(zip(counts, bits)):
            _check_int(b, "index_bits", 0, 31)
            if b != index_width(q, n_out, identity=False) and not (b == 0 and q == n_out):
                raise _Malformed(f"index_bits[{j}] = {b} does not fit {q} centroids of {n_out} kernels (expected "
                                 f"{index_width(q, n_out, identity=False)}"
                                 f"{', or 0 for a channel kept whole' if q == n_out else ''})")
        form = spec.get("form", "train")
        try:
            parse_form(form)
        except ValueError as exc:
            raise _Malformed(f"form: {exc}") from None
    else:
        raise _Malformed(f"unknown module type {_short(t)}")


def _check_preprocess(pre: Any) -> None:
    if pre is None:
        return
    if not isinstance(pre, dict):
        raise _Malformed(f"'preprocess' must be an object or null, got {_short(pre)}")
    size = pre.get("input_size")
    if size is not None:
        if (not isinstance(size, list) or len(size) != 3
                or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= _INPUT_DIM_LIMIT
                           for s in size)
                or math.prod(size) > _INPUT_NUMEL_LIMIT):
            raise _Malformed(f"'preprocess.input_size' must be [C, H, W] of integers in [1, {_INPUT_DIM_LIMIT}] with "
                             f"C * H * W <= {_INPUT_NUMEL_LIMIT}, got {_short(size)}")
    for key in ("mean", "std"):
        values = pre.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or not 1 <= len(values) <= _INPUT_DIM_LIMIT:
            raise _Malformed(f"'preprocess.{key}' must be a list of numbers, got {_short(values)}")
        for v in values:
            _check_number(v, f"'preprocess.{key}'", 0 if key == "std" else -math.inf, low_open=key == "std")
    if pre.get("num_classes") is not None:
        _check_int(pre["num_classes"], "'preprocess.num_classes'", 1)
    if pre.get("dataset") is not None and not isinstance(pre["dataset"], str):
        raise _Malformed(f"'preprocess.dataset' must be a string, got {_short(pre['dataset'])}")


def _check_metadata(path: Path, meta: Dict[str, Any]) -> None:
    """The JSON structure ``load`` relies on, with one clear error where it is malformed."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: malformed KSE metadata ({what}); the file was not written by kse.save, "
                               "or was edited")

    try:
        _check_arch(meta.get("arch"))
        _check_preprocess(meta.get("preprocess"))
        if not isinstance(meta.get("extra", {}), dict):
            raise _Malformed("'extra' must be an object")
        versions = meta.get("module_versions", {})
        if not isinstance(versions, dict):
            raise _Malformed("'module_versions' must be an object")
        for key, value in versions.items():
            _check_int(value, f"'module_versions.{key}'", 0)
        cfg = meta.get("kse_config")
        if cfg is not None:
            from .config import KSEConfig

            if not isinstance(cfg, dict):
                raise _Malformed("'kse_config' must be an object or null")
            try:
                KSEConfig.from_dict(cfg)
            except (ValueError, TypeError) as exc:
                raise _Malformed(f"'kse_config': {exc}") from None
    except _Malformed as exc:
        raise bad(str(exc)) from None
    modules = meta.get("modules", {})
    if not isinstance(modules, dict) or not all(isinstance(v, dict) and "type" in v for v in modules.values()):
        raise bad("'modules' must map module names to objects with a 'type'")
    for name, spec in modules.items():
        try:
            _check_spec(spec)
        except _Malformed as exc:
            raise CheckpointError(f"{path}: module {name!r} has a malformed description ({exc}); the file was not "
                                  "written by kse.save, or was edited") from None


# ----------------------------------------------------------------------------- checksum
def checksum(meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> str:
    """``"sha256:<hex>"`` over the tensors, in name order (each: its name, dtype, shape and bytes
    as stored, little-endian), then the metadata without its ``"checksum"`` entry (JSON with
    sorted keys)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype).replace("torch.", ""), list(t.shape)]).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    rest = {k: v for k, v in meta.items() if k != "checksum"}
    h.update(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())
    return "sha256:" + h.hexdigest()


def _verify_checksum(path: Path, meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> None:
    if meta["format_version"] < 2:
        return  # NOTE: files of format 1 were written before the checksum; they load unverified
    stored = meta.get("checksum")
    if not isinstance(stored, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", stored):
        raise CheckpointError(f"{path}: malformed KSE metadata (format {meta['format_version']} needs a 'checksum' "
                              f"'sha256:<64 hex digits>', got {_short(stored)}); the file was edited")
    try:
        actual = checksum(meta, tensors)
    except RecursionError:
        raise CheckpointError(f"{path}: malformed KSE metadata (nested too deeply)") from None
    if actual != stored:
        raise CheckpointError(f"{path} is damaged: its checksum does not match its contents (a tensor or the "
                              "metadata changed after kse.save wrote it); use an intact copy")


# ----------------------------------------------------------------------------- save / load
def save(model: nn.Module, path: Union[str, Path], preprocess: Optional[Dict[str, Any]] = None,
         arch: Optional[Dict[str, Any]] = None, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model`` to ``path`` (atomically). Returns the path.

    Args:
        model: a model built by :func:`kse.models.get_model` (or pass ``arch``), in any state.
        preprocess: input preprocessing to record (default: ``model.kse_preprocess``).
        arch: ``{"name": ..., "kwargs": {...}}`` (default: ``model.kse_arch``). Arguments that
            fetch weights (torchvision's ``weights=``) are left out: the file holds the weights.
        extra: any JSON-able information to keep in the file.
    """
    from .models import get_model

    model = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    folded = [n for n, m in model.named_modules() if type(m) is KSEConv2d and m.epilogue is not None]
    if folded:
        raise ValueError(f"cannot save a model with BatchNorm folded into KSE layers ({folded[0]}, ...): a folded "
                         "model is for inference and export only; save the model before kse.fold_batchnorm")
    arch = arch or getattr(model, "kse_arch", None)
    if not arch or "name" not in arch:
        raise ValueError("cannot save a model without its architecture: build it with kse.models.get_model(...) "
                         "or pass arch={'name': ..., 'kwargs': {...}}")
    arch = check_arch(_arch_to_save(model, arch))
    preprocess = preprocess if preprocess is not None else getattr(model, "kse_preprocess", None)
    try:
        _check_preprocess(preprocess)
    except _Malformed as exc:
        raise ValueError(f"cannot save: {exc}") from None
    check_has_values(model, "save")
    reference = get_model(arch["name"], **arch.get("kwargs", {}))
    ref_modules = dict(reference.named_modules())
    modules: Dict[str, Any] = {}
    tensors: Dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if type(m) is KSEConv2d:
            spec = _module_spec(m)
            modules[name] = spec
            tensors[f"{name}.assignment_packed"] = pack_indices(local_assignment(m), spec["index_bits"])
        elif type(m) in _RESHAPED:
            ref = ref_modules.get(name)
            if ref is None or type(ref) is not type(m) or _module_spec(ref) != _module_spec(m):
                modules[name] = _module_spec(m)
    state = model.state_dict()
    for key, value in state.items():
        owner = key.rpartition(".")[0]
        if key.endswith(".assignment") and modules.get(owner, {}).get("type") == "KSEConv2d":
            continue
        tensors[key] = value.detach().cpu().contiguous()
    _check_rebuilds(reference, modules, tensors, arch["name"])
    versions = {k: v["version"] for k, v in getattr(state, "_metadata", {}).items()
                if isinstance(v.get("version"), int) and v["version"] != 1}
    cfg = getattr(model, "kse_config", None)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": arch, "preprocess": preprocess,
            "kse_config": cfg, "modules": modules, "module_versions": versions, "extra": extra or {}}
    meta = json.loads(json.dumps(meta))  # as load will read it (tuples become lists, keys strings)
    meta["checksum"] = checksum(meta, tensors)
    save_safetensors(tensors, path, {"kse": json.dumps(meta)})
    return Path(path)


def _looks_pickled(path: Path) -> bool:
    """A torch.save zip archive or a bare pickle, rather than a damaged safetensors file (whose
    first 8 bytes, the header length, may start with the same bytes: then they name a header
    that fits in the file)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not (head[:2] == b"PK" or head[:1] == b"\x80"):
        return False
    return len(head) < 8 or int.from_bytes(head, "little") + 8 > path.stat().st_size


def read_metadata(path: Union[str, Path]) -> Dict[str, Any]:
    """The JSON structure of a ``.kse`` file (raises :class:`CheckpointError` if it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("kse")
    except (SafetensorError, OSError, ValueError) as exc:
        if _looks_pickled(path):
            raise CheckpointError(f"{path} looks like a torch.save (pickle) file, which kse never unpickles; if you "
                                  "trust it, load it yourself (torch.load(..., weights_only=True)) into a model from "
                                  "kse.models.get_model and write it with kse.save") from None
        raise CheckpointError(f"{path} is not a KSE checkpoint (unreadable safetensors: {exc})") from None
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a KSE checkpoint (no 'kse' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: the KSE metadata is not valid JSON (corrupt file)") from None
    except RecursionError:
        raise CheckpointError(f"{path}: malformed KSE metadata (JSON nested too deeply); the file was not written "
                              "by kse.save, or was edited") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a KSE checkpoint (format "
                              f"{_short(meta.get('format')) if isinstance(meta, dict) else None})")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: malformed KSE metadata ('format_version' must be an integer >= 1, got "
                              f"{_short(version) if 'format_version' in meta else 'none'}); the file was not "
                              "written by kse.save, or was edited")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version}, newer than this kse supports "
                              f"({FORMAT_VERSION}); upgrade kse to read it")
    return meta


def _state_mismatch(reference: nn.Module, modules: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> str:
    """What differs between the state dict of ``reference`` (with the described modules swapped
    in) and ``tensors``: missing and unexpected keys, other shapes, other kinds of dtype; empty
    when they fit. A KSE layer's ``assignment`` is stored as ``assignment_packed``."""
    def is_packed_assignment(key: str, suffix: str) -> bool:
        return key.endswith(suffix) and modules.get(key[:-len(suffix)], {}).get("type") == "KSEConv2d"

    state = reference.state_dict()
    expected = {k: v for k, v in state.items() if not is_packed_assignment(k, ".assignment")}
    given = {k: v for k, v in tensors.items() if not is_packed_assignment(k, ".assignment_packed")}
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    shapes = sorted(k for k in set(expected) & set(given) if expected[k].shape != given[k].shape)
    dtypes = sorted(k for k in set(expected) & set(given) if k not in shapes and (
        (expected[k].dtype != given[k].dtype) if not expected[k].is_floating_point() else
        not given[k].is_floating_point()))
    return "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in
                     (("missing", missing), ("unexpected", unexpected), ("other shapes", shapes),
                      ("other dtypes", dtypes)) if keys)


def _check_rebuilds(reference: nn.Module, modules: Dict[str, Any], tensors: Dict[str, torch.Tensor],
                    name: str) -> None:
    """Refuse to write a file :func:`load` could not read: the architecture, with the described
    modules swapped in, must take exactly the tensors being saved."""
    for mod_name, spec in modules.items():
        set_module(reference, mod_name, _build_module(spec))
    detail = _state_mismatch(reference, modules, tensors)
    if detail:
        raise ValueError(f"cannot save: the model's tensors do not fit architecture {name!r} ({detail}); kse.save "
                         "takes a model built by kse.models.get_model (layers compressed or shrunk by kse are "
                         "fine), not a folded, traced or otherwise rebuilt copy")


def _check_kse_tensors(name: str, spec: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> None:
    """A KSE layer's tensors against its description: the kept channels and centroid counts
    stored as buffers equal the JSON's, the centroids, bias and packed indices have the sizes
    the description implies."""
    kept, counts = spec["kept"], spec["counts"]
    kh, kw = spec["kernel_size"]
    expected = {"centroids": ((sum(counts), kh, kw), None), "kept_channels": ((len(kept),), torch.long),
                "centroid_counts": ((len(kept),), torch.long),
                "assignment_packed": ((packed_size(spec["index_bits"], spec["out_channels"]),), torch.uint8)}
    if spec["bias"]:
        expected["bias"] = ((spec["out_channels"],), None)
    for key, (shape, dtype) in expected.items():
        t = tensors.get(f"{name}.{key}")
        if t is None:
            what = "packed indices" if key == "assignment_packed" else key
            raise _Malformed(f"{what} of layer {name!r} are missing" if key == "assignment_packed" else
                             f"layer {name!r}: tensor {key!r} is missing")
        if tuple(t.shape) != shape:
            raise _Malformed(f"layer {name!r}: tensor {key!r} has shape {tuple(t.shape)}, the description needs "
                             f"{shape}")
        if (t.dtype != dtype) if dtype is not None else not t.is_floating_point():
            raise _Malformed(f"layer {name!r}: tensor {key!r} is {t.dtype}, expected "
                             f"{dtype if dtype is not None else 'a floating-point tensor'}")
    if tensors[f"{name}.kept_channels"].tolist() != kept:
        raise _Malformed(f"layer {name!r}: the kept_channels tensor disagrees with the description's 'kept'")
    if tensors[f"{name}.centroid_counts"].tolist() != counts:
        raise _Malformed(f"layer {name!r}: the centroid_counts tensor disagrees with the description's 'counts'")


def _build(path: Path, name: str, kwargs: Dict[str, Any]) -> nn.Module:
    """``get_model(name, **kwargs)``; arguments its builder refuses are a :class:`CheckpointError`."""
    from .models import get_model

    try:
        return get_model(name, **kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot build architecture {name!r} with the file's arguments "
                              f"{_short(kwargs)} ({exc})") from None


class _SkipInitOnMeta(TorchFunctionMode):
    """In-place random or constant fills of meta tensors do nothing (there are no values to
    fill), which spares the weight initialisation its cost when only shapes are wanted."""

    FILLS = {"normal_", "uniform_", "fill_", "zero_", "trunc_normal_", "bernoulli_", "exponential_", "copy_",
             "clamp_", "mul_", "add_", "div_", "sub_", "erfinv_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (getattr(func, "__name__", "") in self.FILLS and args and isinstance(args[0], torch.Tensor)
                and args[0].is_meta):
            return args[0]
        return func(*args, **(kwargs or {}))


def _build_meta(path: Path, name: str, kwargs: Dict[str, Any]) -> Optional[nn.Module]:
    """The architecture on the meta device (shapes without memory), or None where its builder
    needs real tensors."""
    try:
        with torch.device("meta"), _SkipInitOnMeta():
            return _build(path, name, kwargs)
    except (NotImplementedError, RuntimeError):
        return None


def load(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Rebuild the model saved at ``path``; returned in eval mode, with ``kse_arch``,
    ``kse_config``, ``kse_preprocess`` and ``kse_extra`` attributes.

    Before it builds anything, the file is checked, and anything wrong is one
    :class:`CheckpointError` naming it: the metadata's types and ranges (architecture
    arguments: plain values, none that fetches weights or reads a file; every module
    description; preprocessing; KSE config), the checksum (format 2; files of format 1 were
    written before it), every KSE layer's kept channels (distinct, increasing, in range),
    centroid counts and index widths against each other and against the stored tensors, and
    every tensor's shape against the architecture (built on the meta device first, so a file
    cannot make the loader allocate more than the tensors it holds)."""
    path = Path(path)
    meta = read_metadata(path)
    _check_metadata(path, meta)
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({exc})") from None
    _verify_checksum(path, meta, tensors)
    modules: Dict[str, Any] = meta.setdefault("modules", {})
    arch = meta["arch"]
    kwargs = arch.get("kwargs", {})
    for name, spec in modules.items():
        try:
            if spec["type"] == "KSEConv2d":
                _check_kse_tensors(name, spec, tensors)
            else:
                with torch.device("meta"):
                    built = _build_module(spec)
                prefix = name + "."
                detail = _state_mismatch(built, {}, {k[len(prefix):]: v for k, v in tensors.items()
                                                     if k.startswith(prefix) and "." not in k[len(prefix):]})
                if detail:
                    raise _Malformed(f"module {name!r} does not fit its tensors ({detail})")
        except _Malformed as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: module {name!r} has a malformed description ({type(exc).__name__}: "
                                  f"{exc})") from None
    skeleton = _build_meta(path, arch["name"], kwargs)
    reference = skeleton if skeleton is not None else _build(path, arch["name"], kwargs)
    kse_layers = _kse_layers(path, reference, modules, arch["name"])
    _check_layout(path, reference, modules, kse_layers, tensors, meta, arch["name"])
    model = reference if skeleton is None else _build(path, arch["name"], kwargs)
    for name, spec in modules.items():
        set_module(model, name, kse_layers[name] if name in kse_layers else _build_module(spec))
    floating = {v.dtype for v in tensors.values() if v.is_floating_point()}
    if len(floating) == 1 and floating != {torch.float32}:  # a float64 / float16 model comes back as saved
        model = model.to(floating.pop())
    state: Dict[str, torch.Tensor] = OrderedDict()
    for name, spec in modules.items():
        if spec["type"] == "KSEConv2d":
            packed = tensors.pop(f"{name}.assignment_packed")
            try:
                local = unpack_indices(packed, spec["index_bits"], spec["counts"], spec["out_channels"])
            except CheckpointError as exc:
                raise CheckpointError(f"{path}: layer {name!r}: {exc}") from None
            state[f"{name}.assignment"] = local + centroid_offsets(torch.tensor(spec["counts"])).unsqueeze(1)
    state.update(tensors)
    state._metadata = _module_versions(model, meta)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        detail = " ".join(str(exc).split())  # the missing / unexpected keys come after the first line
        raise CheckpointError(f"{path}: tensors do not match the architecture ({detail[:400]})") from None
    for name, spec in modules.items():
        if spec["type"] == "KSEConv2d":
            layer, form = model.get_submodule(name), spec.get("form", "train")
            try:
                layer.set_form(form)
            except ValueError as exc:  # e.g. the fused kernel cannot be built on this machine
                fallback = without_fused(form)
                warnings.warn(f"layer {name!r}: saved form {form!r} unavailable here ({exc}); using {fallback!r}",
                              RuntimeWarning)
                layer.set_form(fallback)
    model.kse_arch = arch
    model.kse_config = meta.get("kse_config")
    model.kse_preprocess = meta.get("preprocess")
    model.kse_extra = meta.get("extra", {})
    return model.to(device).eval()


def _kse_layers(path: Path, reference: nn.Module, modules: Dict[str, Any], arch_name: str) -> Dict[str, nn.Module]:
    """The KSE layers described in the file, each checked against the convolution it replaced in
    the architecture (same kernel size, stride and dilation; no more input or output channels:
    compression only removes channels), so that a layer's memory is bounded by the
    architecture's own convolution."""
    layers = {}
    for name, spec in modules.items():
        if spec["type"] != "KSEConv2d":
            continue
        try:
            conv = reference.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: module {name!r} does not exist in {arch_name}") from None
        if type(conv) is not nn.Conv2d or conv.groups != 1:
            raise CheckpointError(f"{path}: KSE layer {name!r} replaces a {type(conv).__name__}"
                                  f"{' with groups ' + str(conv.groups) if type(conv) is nn.Conv2d else ''} in "
                                  f"{arch_name}; KSE replaces only nn.Conv2d with groups 1 (the file was edited)")
        geometry = {"kernel_size": list(conv.kernel_size), "stride": list(conv.stride), "dilation": list(conv.dilation)}
        for key, value in geometry.items():
            if spec[key] != value:
                raise CheckpointError(f"{path}: KSE layer {name!r} has {key} {spec[key]}, the convolution it "
                                      f"replaces in {arch_name} {value} (the file was edited)")
        if spec["in_channels"] > conv.in_channels or spec["out_channels"] > conv.out_channels:
            raise CheckpointError(f"{path}: KSE layer {name!r} has {spec['in_channels']} -> {spec['out_channels']} "
                                  f"channels, more than the convolution it replaces in {arch_name} "
                                  f"({conv.in_channels} -> {conv.out_channels}; the file was edited)")
        try:
            layers[name] = _build_module(spec)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: module {name!r} has a malformed description ({type(exc).__name__}: "
                                  f"{exc})") from None
    return layers


def _check_layout(path: Path, reference: nn.Module, modules: Dict[str, Any], kse_layers: Dict[str, nn.Module],
                  tensors: Dict[str, torch.Tensor], meta: Dict[str, Any], arch_name: str) -> None:
    """Every described module exists in the architecture, the module versions name modules of
    it, and the architecture with the described modules takes exactly the file's tensors."""
    for name in modules:
        try:
            reference.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: module {name!r} does not exist in {arch_name}") from None
    with torch.device("meta"):
        for name, spec in modules.items():
            set_module(reference, name, kse_layers[name] if name in kse_layers else _build_module(spec))
    known = {name for name, _ in reference.named_modules()}
    unknown = sorted(set(meta.get("module_versions", {})) - known)
    if unknown:
        raise CheckpointError(f"{path}: malformed KSE metadata ('module_versions' names {unknown[0]!r}, not a "
                              f"module of {arch_name}); the file was not written by kse.save, or was edited")
    detail = _state_mismatch(reference, modules, tensors)
    if detail:
        raise CheckpointError(f"{path}: tensors do not match the architecture ({detail})")


def _module_versions(model: nn.Module, meta: Dict[str, Any]) -> "OrderedDict[str, Dict[str, int]]":
    """The state dict's module versions (``_metadata``, read by modules such as torchvision's
    MNASNet to convert older layouts): as the file recorded them (version 1 where it lists none),
    or, for a file of format 1, which did not record them, this code's own."""
    own = model.state_dict()._metadata  # type: ignore[attr-defined]
    if meta["format_version"] < 2:
        return own
    stored = meta.get("module_versions", {})
    return OrderedDict((prefix, {**entry, "version": stored.get(prefix, 1)}) for prefix, entry in own.items())
