"""The ``.kse`` file: safetensors tensors + JSON structure, no pickle.

``kse.save(model, path)`` writes any model of the registry (:mod:`kse.models`), dense,
KSE-compressed, or with channel widths changed (dead-channel removal, filter pruning):

* tensors: the state dict, except that each KSE layer's assignment is stored as packed
  indices (``ceil(log2 q_c)`` bits per kernel; none for ``q_c = 1`` or a channel kept whole);
* metadata ``"kse"`` (JSON): format version, architecture name and arguments, the KSE
  config, every conv / BatchNorm / Linear shape that differs from the freshly built
  architecture, every KSE layer's structure (kept channels, centroid counts, index bit
  widths, inference form), the input preprocessing the model expects, and free ``extra``.

``kse.load(path)`` rebuilds the architecture, reshapes what was reshaped, swaps the KSE layers
in and loads the tensors: the caller rebuilds nothing by hand.

Example::

    >>> import kse, torch
    >>> from kse.models import get_model
    >>> net = get_model("resnet20").eval()
    >>> kse.save(net, "/tmp/r20.kse")
    >>> torch.equal(kse.load("/tmp/r20.kse")(torch.ones(1, 3, 32, 32)), net(torch.ones(1, 3, 32, 32)))
    True
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_path
from .conv import KSEConv2d, centroid_offsets, without_fused
from .modules import set_module

FORMAT = "kse"
FORMAT_VERSION = 1
_RESHAPED = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


class CheckpointError(ValueError):
    """A file that is not a readable KSE checkpoint."""


# ----------------------------------------------------------------------------- index packing
def pack_indices(local: torch.Tensor, widths: list) -> torch.Tensor:
    """Pack ``local: LongTensor[K, N]`` row j with ``widths[j]`` bits per value (LSB first)."""
    bits = []
    values = local.cpu().numpy()
    for j, b in enumerate(widths):
        if b:
            bits.append(((values[j][:, None] >> np.arange(b)) & 1).astype(np.uint8).reshape(-1))
    flat = np.concatenate(bits) if bits else np.zeros(0, dtype=np.uint8)
    return torch.from_numpy(np.packbits(flat, bitorder="little").copy())


def unpack_indices(packed: torch.Tensor, widths: list, counts: list, out_channels: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`; channels stored with 0 bits get 0 (q = 1) or identity."""
    total = sum(widths) * out_channels
    flat = np.unpackbits(packed.numpy(), bitorder="little")
    if flat.size < total:
        raise CheckpointError(f"packed indices hold {flat.size} bits, expected {total}")
    local = torch.empty(len(widths), out_channels, dtype=torch.long)
    pos = 0
    for j, (b, q) in enumerate(zip(widths, counts)):
        if b == 0:
            local[j] = 0 if q == 1 else torch.arange(out_channels)
            continue
        chunk = flat[pos:pos + b * out_channels].reshape(out_channels, b).astype(np.int64)
        local[j] = torch.from_numpy((chunk << np.arange(b)).sum(1))
        pos += b * out_channels
    if (local >= torch.tensor(counts).unsqueeze(1)).any():
        raise CheckpointError("packed indices point past their channel's centroids (corrupt file)")
    return local


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
                "index_bits": m.index_bit_widths(), "form": m.form}
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


# ----------------------------------------------------------------------------- save / load
def save(model: nn.Module, path: Union[str, Path], preprocess: Optional[Dict[str, Any]] = None,
         arch: Optional[Dict[str, Any]] = None, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model`` to ``path`` (atomically). Returns the path.

    Args:
        model: a model built by :func:`kse.models.get_model` (or pass ``arch``), in any state.
        preprocess: input preprocessing to record (default: ``model.kse_preprocess``).
        arch: ``{"name": ..., "kwargs": {...}}`` (default: ``model.kse_arch``).
        extra: any JSON-able information to keep in the file.
    """
    from .models import get_model

    model = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    folded = [n for n, m in model.named_modules() if type(m) is KSEConv2d and m._epilogue is not None]
    if folded:
        raise ValueError(f"cannot save a model with BatchNorm folded into KSE layers ({folded[0]}, ...): a folded "
                         "model is for inference and export only; save the model before kse.fold_batchnorm")
    arch = arch or getattr(model, "kse_arch", None)
    if not arch or "name" not in arch:
        raise ValueError("cannot save a model without its architecture: build it with kse.models.get_model(...) "
                         "or pass arch={'name': ..., 'kwargs': {...}}")
    reference = get_model(arch["name"], **arch.get("kwargs", {}))
    ref_modules = dict(reference.named_modules())
    modules: Dict[str, Any] = {}
    tensors: Dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if type(m) is KSEConv2d:
            spec = _module_spec(m)
            modules[name] = spec
            tensors[f"{name}.assignment_packed"] = pack_indices(m.local_assignment(), spec["index_bits"])
        elif type(m) in _RESHAPED:
            ref = ref_modules.get(name)
            if ref is None or type(ref) is not type(m) or _module_spec(ref) != _module_spec(m):
                modules[name] = _module_spec(m)
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if key.endswith(".assignment") and modules.get(owner, {}).get("type") == "KSEConv2d":
            continue
        tensors[key] = value.detach().cpu().contiguous()
    _check_rebuilds(reference, modules, tensors, arch["name"])
    cfg = getattr(model, "kse_config", None)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": arch,
            "preprocess": preprocess if preprocess is not None else getattr(model, "kse_preprocess", None),
            "kse_config": cfg, "modules": modules, "extra": extra or {}}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"kse": json.dumps(meta)})
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
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a KSE checkpoint (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version}, newer than this kse supports "
                              f"({FORMAT_VERSION}); upgrade kse to read it")
    return meta


def _check_rebuilds(reference: nn.Module, modules: Dict[str, Any], tensors: Dict[str, torch.Tensor],
                    name: str) -> None:
    """Refuse to write a file :func:`load` could not read: the architecture, with the described
    modules swapped in, must take exactly the tensors being saved."""
    for mod_name, spec in modules.items():
        set_module(reference, mod_name, _build_module(spec))
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()
                if not (k.endswith(".assignment") and modules.get(k.rpartition(".")[0], {}).get("type") == "KSEConv2d")}
    given = {k: tuple(v.shape) for k, v in tensors.items() if not k.endswith(".assignment_packed")}
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    shapes = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
    if missing or unexpected or shapes:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in
                           (("missing", missing), ("unexpected", unexpected), ("other shapes", shapes)) if keys)
        raise ValueError(f"cannot save: the model's tensors do not fit architecture {name!r} ({detail}); kse.save "
                         "takes a model built by kse.models.get_model (layers compressed or shrunk by kse are "
                         "fine), not a folded, traced or otherwise rebuilt copy")


def _check_metadata(path: Path, meta: Any) -> None:
    """The JSON structure ``load`` relies on, with one clear error where it is malformed."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: malformed KSE metadata ({what}); the file was not written by kse.save, "
                               "or was edited")

    arch = meta.get("arch")
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise bad("'arch' must be an object with a 'name'")
    if not isinstance(arch.get("kwargs", {}), dict):
        raise bad("'arch.kwargs' must be an object")
    modules = meta.get("modules", {})
    if not isinstance(modules, dict) or not all(isinstance(v, dict) and "type" in v for v in modules.values()):
        raise bad("'modules' must map module names to objects with a 'type'")


def load(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Rebuild the model saved at ``path``; returned in eval mode, with ``kse_arch``,
    ``kse_config``, ``kse_preprocess`` and ``kse_extra`` attributes."""
    from .models import get_model

    meta = read_metadata(path)
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({exc})") from None
    _check_metadata(Path(path), meta)
    meta.setdefault("modules", {})
    arch = meta["arch"]
    model = get_model(arch["name"], **arch.get("kwargs", {}))
    for name, spec in meta["modules"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: module {name!r} does not exist in {arch['name']}") from None
        try:
            set_module(model, name, _build_module(spec))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: module {name!r} has a malformed description ({type(exc).__name__}: "
                                  f"{exc})") from None
    floating = {v.dtype for v in tensors.values() if v.is_floating_point()}
    if len(floating) == 1 and floating != {torch.float32}:  # a float64 / float16 model comes back as saved
        model = model.to(floating.pop())
    state = {}
    for name, spec in meta["modules"].items():
        if spec["type"] == "KSEConv2d":
            packed = tensors.pop(f"{name}.assignment_packed", None)
            if packed is None:
                raise CheckpointError(f"{path}: packed indices of layer {name!r} are missing")
            try:
                local = unpack_indices(packed, spec["index_bits"], spec["counts"], spec["out_channels"])
            except CheckpointError as exc:
                raise CheckpointError(f"{path}: layer {name!r}: {exc}") from None
            state[f"{name}.assignment"] = local + centroid_offsets(torch.tensor(spec["counts"])).unsqueeze(1)
    state.update(tensors)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())  # the missing / unexpected keys come after the first line
        raise CheckpointError(f"{path}: tensors do not match the architecture ({detail[:400]})") from None
    for name, spec in meta["modules"].items():
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
