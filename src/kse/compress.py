"""One-call KSE compression of any PyTorch CNN: ``compress_(model, KSEConfig(...))``.

Steps (KSE Sec. 3, applied once to all chosen layers of a trained model):
1. choose the layers: ``type(m) is nn.Conv2d`` (never an already compressed layer), groups
   == 1, not the first convolution, filtered by ``include``/``exclude``/``filter_fn``;
2. score each input channel with the KSE indicator and turn scores into centroid counts;
3. cluster the kernels (batched k-means) and build a :class:`~kse.conv.KSEConv2d` per layer;
4. remove dead producer channels exactly (:mod:`kse.dead_channels`);
5. swap the new modules in. Nothing is changed until every step has succeeded, and the
   swap itself is undone if it fails: a failed ``compress_`` leaves the model as it was.

Example::

    >>> import torch, kse
    >>> from kse.models import get_model
    >>> net = get_model("resnet20", num_classes=10).eval()
    >>> kse.compress_(net, kse.KSEConfig(G=4))
    >>> net(torch.randn(1, 3, 32, 32)).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
import fnmatch
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .config import KSEConfig
from .conv import KSEConv2d
from .indicator import _indicator64, centroid_counts
from .kmeans import cluster_many
from .module_utils import check_has_values, eval_mode, set_module
from .dead_channels import find_dead_channels, shrink_batchnorm, shrink_conv


@dataclass
class LayerPlan:
    """What KSE decides for one layer, before anything is changed."""

    name: str
    in_channels: int
    out_channels: int
    indicator: Tensor  # [C_in], in [0, 1]
    counts: Tensor  # [C_in], centroids per input channel (0 = dropped)

    @property
    def kept(self) -> int:
        return int((self.counts > 0).sum())

    @property
    def centroids(self) -> int:
        return int(self.counts.sum())


def _first_conv_name(model: nn.Module, example: Optional[Tensor]) -> Optional[str]:
    """The convolution that reads the network input: the first one to run, else the first registered."""
    if example is not None:
        order: List[str] = []
        hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: order.append(n))
                 for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, KSEConv2d))]
        try:
            with eval_mode(model), torch.no_grad():
                model(example)
        except Exception as exc:  # noqa: BLE001 - re-raised as one clear error
            raise ValueError(f"the model does not run on an example input of shape {tuple(example.shape)} "
                             f"({type(exc).__name__}: {exc}); pass KSEConfig(input_size=(C, H, W)) or "
                             "example_inputs that it accepts") from None
        finally:
            for h in hooks:
                h.remove()
        if order:
            return order[0]
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, KSEConv2d)):
            return name
    return None


def select_layers(model: nn.Module, cfg: KSEConfig, example: Optional[Tensor] = None) -> List[str]:
    """Names of the convolutions ``cfg`` compresses, in registration order."""
    first = _first_conv_name(model, example) if cfg.skip_first else None
    chosen = []
    for name, m in model.named_modules():
        if type(m) is not nn.Conv2d or name == first:
            continue
        if m.groups != 1 or m.padding_mode != "zeros":
            # NOTE: KSE clusters the N kernels that read one input channel; a grouped or
            # depthwise conv has no such set, so it is always left alone
            continue
        if cfg.include and not any(fnmatch.fnmatchcase(name, p) for p in cfg.include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
            continue
        if cfg.filter_fn is not None and not cfg.filter_fn(m, name):
            continue
        chosen.append(name)
    return chosen


def _example_input(model: nn.Module, cfg: KSEConfig) -> Tensor:
    size = cfg.input_size
    if size is None:
        pre = getattr(model, "kse_preprocess", None) or {}
        size = tuple(pre["input_size"]) if "input_size" in pre else None
    if size is None:
        first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, KSEConv2d))), None)
        size = (first.in_channels if first is not None else 3, 64, 64)
    p = next(model.parameters(), None)
    # a private generator: compressing must not move the caller's random stream
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(cfg.seed))
    return x.to(device=p.device if p is not None else None,
                dtype=p.dtype if p is not None and p.is_floating_point() else None)


def _no_eligible_message(model: nn.Module, cfg: KSEConfig, example: Optional[Tensor]) -> str:
    """Why :func:`select_layers` chose nothing: each convolution's reason, with the option that changes it."""
    first = _first_conv_name(model, example) if cfg.skip_first else None
    convs = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d]
    reasons: List[str] = []
    if first is not None and any(n == first for n, _ in convs):
        reasons.append(f"{first!r} is the first convolution (it reads the input), left dense by default: "
                       "KSEConfig(skip_first=False) compresses it")
    rest = [(n, m) for n, m in convs if n != first]
    grouped = [n for n, m in rest if m.groups != 1 or m.padding_mode != "zeros"]
    if grouped:
        reasons.append(f"{len(grouped)} grouped, depthwise or non-zero-padded (never compressed: KSE needs groups == 1 "
                       f"and zero padding), e.g. {grouped[0]!r}")
    rest = [(n, m) for n, m in rest if n not in grouped]
    for why, out in (
            (f"outside include={cfg.include}: widen the patterns",
             [n for n, _ in rest if cfg.include and not any(fnmatch.fnmatchcase(n, p) for p in cfg.include)]),
            (f"matched by exclude={cfg.exclude}: narrow the patterns",
             [n for n, _ in rest if any(fnmatch.fnmatchcase(n, p) for p in cfg.exclude)]),
            ("rejected by filter_fn", [n for n, m in rest if cfg.filter_fn is not None and not cfg.filter_fn(m, n)])):
        if out:
            reasons.append(f"{len(out)} {why} (e.g. {out[0]!r})")
    n_kse = sum(isinstance(m, KSEConv2d) for m in model.modules())
    if n_kse:
        reasons.append(f"{n_kse} already KSE layers (compress the dense model instead)")
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    if n_linear:
        reasons.append(f"{n_linear} nn.Linear layers, which KSE does not compress (it clusters convolution kernels; "
                       "a vision transformer such as ViT or Swin has only its patch-embedding convolution)")
    if not convs and not n_kse:
        reasons.append("the model has no nn.Conv2d layer")
    return (f"no eligible convolution to compress: the model has {len(convs)} plain nn.Conv2d layers; "
            + "; ".join(reasons))


def plan(model: nn.Module, cfg: Optional[KSEConfig] = None, example: Optional[Tensor] = None) -> List[LayerPlan]:
    """Indicator and centroid counts of every layer ``cfg`` selects; the model is not changed."""
    cfg = cfg if cfg is not None else KSEConfig()
    if not isinstance(cfg, KSEConfig):
        raise TypeError(f"config must be a kse.KSEConfig, got {type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_has_values(model, "compress")
    names = select_layers(model, cfg, example)
    if not names:
        raise ValueError(_no_eligible_message(model, cfg, example))

    def score(name: str) -> LayerPlan:
        conv = model.get_submodule(name)
        try:
            v = _indicator64(conv.weight, cfg.alpha, cfg.k, cfg.score, cfg.entropy_layout)
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from None
        return LayerPlan(name, conv.in_channels, conv.out_channels, v,
                         centroid_counts(v, conv.out_channels, cfg.G, cfg.T))

    return list(_map_layers(score, names))


def _map_layers(fn: Callable, *iterables) -> Iterator:
    """``map(fn, ...)`` over layers (results in order, as they come), two layers at a time
    where there are two or more cores.

    NOTE: the per-layer work is many small tensor operations that leave cores idle; PyTorch
    releases the GIL inside them, so two threads of one intra-op thread each overlap well.
    Results are the same as sequentially (each call is independent)."""
    threads = torch.get_num_threads()
    workers = 2 if threads >= 2 else 1
    torch.set_num_threads(max(1, threads // workers))
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            yield from pool.map(fn, *iterables)
    finally:
        torch.set_num_threads(threads)


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def build_layers(model: nn.Module, plans: List[LayerPlan], config: Optional[KSEConfig] = None,
                 verbose: bool = False, clusters: Optional[dict] = None,
                 seed_index: Optional[Dict[str, int]] = None) -> Dict[str, KSEConv2d]:
    """The :class:`~kse.conv.KSEConv2d` that replaces each planned layer (k-means of its kernels
    with ``plan.counts`` centroids per input channel); the model is not changed.

    ``plans`` are what :func:`plan` returns, or plans with other counts (to cluster the layers
    with centroid counts chosen another way). Layer i of ``plans`` draws its k-means++ numbers
    from a generator seeded with ``(config.seed, i)``: a layer's clusters depend neither on the
    other layers nor on how the work is batched and shared out (see ``cluster_many``).
    ``seed_index`` gives a layer another i (its position among the layers of a full plan when
    ``plans`` holds some of them); ``clusters`` caches the k-means results by ``(i, counts)``
    across calls (a budget search builds several candidates).
    """
    cfg = config if config is not None else KSEConfig()
    convs = [model.get_submodule(p.name) for p in plans]
    for p, conv in zip(plans, convs):
        try:
            KSEConv2d.check_conv(conv)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"layer {p.name!r}: {exc}") from None
    index = [seed_index[p.name] if seed_index is not None else i for i, p in enumerate(plans)]
    keys = [(i, tuple(p.counts.tolist())) for i, p in zip(index, plans)]
    cache = clusters if clusters is not None else {}
    todo = [j for j, key in enumerate(keys) if key not in cache]
    jobs = [(convs[j].weight, plans[j].counts, torch.Generator().manual_seed(cfg.seed * 100_003 + index[j]))
            for j in todo]
    for j, found in zip(todo, cluster_many(jobs, cfg.kmeans_iters, cfg.n_init, map_fn=_map_layers)):
        cache[keys[j]] = found
    new: Dict[str, KSEConv2d] = {}
    for i, (p, conv, key) in enumerate(zip(plans, convs, keys)):
        new[p.name] = KSEConv2d.from_clusters(conv, p.counts, *cache[key]).train(conv.training)
        _log(verbose, f"kse: [{i + 1}/{len(plans)}] {p.name}: kept {p.kept}/{p.in_channels}, "
                      f"{p.centroids} centroids")
    return new


def compress_(model: nn.Module, config: Optional[KSEConfig] = None, example_inputs: Optional[Tensor] = None,
              verbose: bool = False) -> List[LayerPlan]:
    """Compress ``model`` in place with KSE; returns the per-layer plans.

    Args:
        model: any ``nn.Module`` with ``nn.Conv2d`` layers (trained, for a useful result).
        config: :class:`KSEConfig` (default: G=4, T=0).
        example_inputs: a batch the model accepts, used to find the first conv and to trace
            the graph for dead-channel removal (default: random, see ``KSEConfig.input_size``).
        verbose: print progress to stderr.
    """
    cfg = config if config is not None else KSEConfig()
    if not isinstance(cfg, KSEConfig):
        raise TypeError(f"config must be a kse.KSEConfig, got {type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    t0 = time.time()
    example = example_inputs if example_inputs is not None else _example_input(model, cfg)
    plans = plan(model, cfg, example)
    _log(verbose, f"kse: scored {len(plans)} layers in {time.time() - t0:.1f}s")

    if cfg.target() is not None:
        from .budget import fit_to_target_

        plans = fit_to_target_(model, cfg, plans, example, verbose)
    else:
        new, final = build_replacements(model, plans, cfg, example, verbose)
        swap_in(model, new, final, example)
    model.kse_config = cfg.to_dict()
    _log(verbose, f"kse: done in {time.time() - t0:.1f}s")
    return plans


def build_replacements(model: nn.Module, plans: List[LayerPlan], cfg: KSEConfig, example: Tensor,
                       verbose: bool = False, clusters: Optional[dict] = None, graph=None,
                       seed_index: Optional[Dict[str, int]] = None):
    """The modules that replace the model's, nothing changed yet: ``(new, final)``, the KSE
    layers alone (:func:`build_layers`; ``clusters`` and ``seed_index`` go to it) and with
    dead channels removed (``final`` also holds shrunk producers and BatchNorms). ``graph`` is
    a :class:`kse.dead_channels.ChannelGraph` already traced for ``model``."""
    new: Dict[str, nn.Module] = dict(build_layers(model, plans, cfg, verbose, clusters, seed_index))
    final = dict(new)
    if cfg.remove_dead_channels:
        counts = {p.name: p.counts for p in plans}
        removal = (graph.dead_channels(counts, cfg.channel_multiple) if graph is not None
                   else find_dead_channels(model, counts, example, cfg.channel_multiple))
        for name, rm in removal.items():
            module = final.get(name, model.get_submodule(name))
            if isinstance(module, KSEConv2d):
                if rm["in"]:
                    module = module.remove_in_channels(sorted(rm["in"]))
                if rm["out"]:
                    module = module.remove_out_channels(sorted(rm["out"]))
            elif type(module) is nn.Conv2d:
                module = shrink_conv(module, rm["out"], rm["in"])
            elif type(module) is nn.BatchNorm2d:
                module = shrink_batchnorm(module, rm["out"])
            final[name] = module
        n_removed = sum(len(rm["out"]) for name, rm in removal.items()
                        if isinstance(model.get_submodule(name), nn.Conv2d))
        _log(verbose, f"kse: {n_removed} dead output channels to remove in {len(removal)} modules")
    return new, final


def swap_in(model: nn.Module, new: Dict[str, nn.Module], final: Dict[str, nn.Module], example: Tensor
            ) -> Dict[str, nn.Module]:
    """Put the replacements into ``model``; returns the modules they replaced. ``final`` is
    used unless the removal of dead channels changed the outputs (then ``new``, with a
    warning). On any failure the model is left as it was."""
    originals = {name: model.get_submodule(name) for name in final}
    try:
        for name, module in new.items():
            set_module(model, name, module)
        if final.keys() != new.keys() or any(final[n] is not new[n] for n in new):
            before = _outputs(model, example)
            for name, module in final.items():
                set_module(model, name, module)
            after = _outputs(model, example)
            difference = output_difference(before, after)
            if not difference <= 1e-4:
                # NOTE: the graph analysis should make this impossible; if an operation was
                # misread, keep the (correct) compression without the removal
                warnings.warn(f"dead-channel removal changed the outputs (largest relative difference "
                              f"{difference:.3g}); it was skipped", RuntimeWarning)
                for name in final:
                    set_module(model, name, new.get(name, originals[name]))
    except BaseException:
        for name, module in originals.items():
            set_module(model, name, module)
        raise
    return originals


def _outputs(model: nn.Module, example: Tensor) -> Tensor:
    with eval_mode(model), torch.no_grad():
        return model(example)


def output_difference(a, b) -> float:
    """Largest relative difference ``max|a - b| / max|a|`` over the tensors of two model outputs
    of any nesting (tensors, tuples, lists, dicts); ``inf`` where their structure, keys, shapes or
    non-tensor values differ."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape:
            return float("inf")
        if a.numel() == 0:
            return 0.0
        a, b = a.detach().double(), b.detach().double()
        return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or list(a) != list(b):
            return float("inf")
        return max((output_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        if type(a) is not type(b) or len(a) != len(b):
            return float("inf")
        return max((output_difference(x, y) for x, y in zip(a, b)), default=0.0)
    try:
        return 0.0 if type(a) is type(b) and bool(a == b) else float("inf")
    except Exception:  # noqa: BLE001 - values without a plain equality (arrays ...) count as different
        return float("inf")


def compress(model: nn.Module, config: Optional[KSEConfig] = None, example_inputs: Optional[Tensor] = None,
             verbose: bool = False) -> nn.Module:
    """Like :func:`compress_`, on a deep copy; the original model is left unchanged."""
    copied = copy.deepcopy(model)
    compress_(copied, config, example_inputs, verbose)
    return copied
