"""Training recipes as plain functions, after torchvision's ``references/classification``:
``train_one_epoch``, ``evaluate`` and ``fit`` (epochs, checkpoints, resume, metrics).

Baseline training and KSE fine-tuning share them (docs/method.md §6: SGD with momentum, multistep
or cosine learning rate). ``fit`` writes ``last.ckpt`` atomically after every epoch
(safetensors; optimizer, scheduler and RNG state included, no pickle), then rewrites
``metrics.jsonl`` (one JSON line per epoch, from the rows the checkpoint holds);
``resume=True`` continues exactly where it stopped. A run that trains nothing (no batch per
epoch) or diverges (a non-finite loss, output, parameter or BatchNorm statistic) stops with an
error instead of saving. With ``TrainConfig(swa_from=k)`` the run ends with the mean of the
weights of epochs k to the last (``kse.weight_average``), BatchNorm statistics re-estimated,
evaluated as one more row of ``metrics.jsonl`` marked ``swa_epochs``.
Under ``torchrun`` it uses DistributedDataParallel and a DistributedSampler, and only rank 0
writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from .atomic import save_safetensors, write_text
from .weight_average import accumulate_, check_average, load_average_


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (validated on creation)."""

    epochs: int = 30
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # NOTE: Nesterov momentum and no weight decay on BatchNorm and bias parameters (common practice);
    # the KSE authors' code uses plain momentum and decays every parameter (official_sgd)
    nesterov: bool = True
    decay_norm_and_bias: bool = False
    batch_size: int = 128
    schedule: str = "cosine"  # "cosine" or "multistep"
    milestones: List[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of epochs
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    amp: bool = False
    channels_last: bool = True
    # torch.compile the training steps and the evaluation's forward passes (checkpoints use the
    # module itself): the first steps pay for the compilation, once per process
    compile: bool = False
    seed: int = 0
    max_steps_per_epoch: Optional[int] = None  # for quick runs and tests
    # stochastic weight averaging (kse.weight_average): from this epoch (1-based) to the last,
    # average the weights at each epoch's end; the run ends with that mean, its BatchNorm
    # statistics re-estimated over one pass of the training data
    swa_from: Optional[int] = None

    def __post_init__(self) -> None:
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.epochs) or self.epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.schedule not in ("cosine", "multistep"):
            raise ValueError(f"schedule must be 'cosine' or 'multistep', got {self.schedule!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        for name in ("nesterov", "decay_norm_and_bias", "amp", "channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not all(0 < m <= 1 for m in self.milestones):
            raise ValueError(f"milestones must be fractions of epochs in (0, 1], got {self.milestones!r}; "
                             "e.g. [0.5, 0.75] drops the rate at half and three quarters of the run")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma!r}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs) = [0, {self.epochs}), got {self.warmup_epochs!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.max_steps_per_epoch is not None and (not is_int(self.max_steps_per_epoch)
                                                     or self.max_steps_per_epoch < 1):
            raise ValueError(f"max_steps_per_epoch must be None or an integer >= 1, got {self.max_steps_per_epoch!r}")
        if self.swa_from is not None and (not is_int(self.swa_from) or not 1 <= self.swa_from <= self.epochs):
            raise ValueError(f"swa_from must be None or an epoch in [1, epochs] = [1, {self.epochs}], got "
                             f"{self.swa_from!r}; e.g. {max(1, self.epochs // 2)} averages the second half of the run")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at a global step: linear warm-up, then cosine or multistep."""
    epoch = step / steps_per_epoch
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return cfg.lr * (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        total = cfg.epochs * steps_per_epoch
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * step / total))
    drops = sum(epoch >= m * cfg.epochs for m in cfg.milestones)
    return cfg.lr * cfg.gamma ** drops


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum (Nesterov's unless ``cfg.nesterov`` is off); weight decay on every
    parameter with ``cfg.decay_norm_and_bias``, else not on BatchNorm and bias parameters (1-D)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 and not cfg.decay_norm_and_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def _progress(done: int, total: int, images: float, t0: float, extra: str) -> None:
    """A progress bar on a terminal; in a log file, one line at the end of the epoch."""
    if not is_main_process() or not sys.stderr.isatty() and done != total:
        return
    rate = images / max(time.time() - t0, 1e-9)
    bar = "#" * int(30 * done / total)
    end = "\n" if done == total else ""
    print(f"\r  [{bar:<30}] {done}/{total} {extra} {rate:.0f} img/s", end=end, file=sys.stderr, flush=True)


def _autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """The mixed precision of the training forward passes: with ``cfg.amp``, float16 on CUDA (with
    a GradScaler) and bfloat16 on the CPU (float32's exponent range, no scaler needed;
    docs/performance.md has the measured speed-up); otherwise a disabled context."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=cfg.amp and device.type in ("cuda", "cpu"))


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    epoch: int, device: torch.device, scaler: Optional[torch.amp.GradScaler] = None,
                    forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, float]:
    """One pass over ``loader``; returns mean loss, top-1 accuracy and throughput. ``forward``
    runs the model's forward pass in the steps (default: ``model`` itself; a compiled one)."""
    model.train()
    forward = model if forward is None else forward
    steps = _epoch_steps(loader, cfg)
    if steps == 0:
        raise ValueError(f"the training data gives no batch per epoch ({_data_size(loader)}, batch size "
                         f"{getattr(loader, 'batch_size', '?')}, incomplete batches dropped): training would change "
                         "nothing; use a batch size no larger than the dataset (--batch-size)")
    total_loss = correct = seen = 0.0
    t0 = time.time()
    for i, (x, y) in enumerate(loader):
        if i >= steps:
            break
        lr = lr_at(cfg, epoch * steps + i, steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(cfg, device):
            out = forward(x)
            loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
        if not (torch.isfinite(loss) & torch.isfinite(out).all()):  # one synchronisation for both
            what = f"loss became {loss.item()}" if not torch.isfinite(loss) else "the outputs hold NaN or Inf"
            raise FloatingPointError(f"training diverged: {what} at epoch {epoch + 1} step {i + 1}; lower the "
                                     f"learning rate (--lr, now {cfg.lr:g})")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and cfg.amp:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = y.numel()
        total_loss += loss.item() * n
        correct += (out.argmax(1) == y).sum().item()
        seen += n
        if i % 20 == 0 or i == steps - 1:
            _progress(i + 1, steps, seen, t0, f"loss {total_loss / seen:.3f} acc {100 * correct / seen:.2f}% lr {lr:.4f}")
    check_finite(model, f"after epoch {epoch + 1}", f"lower the learning rate (--lr, now {cfg.lr:g})")
    return {"train_loss": total_loss / max(seen, 1), "train_top1": 100 * correct / max(seen, 1),
            "train_img_per_s": seen / max(time.time() - t0, 1e-9)}


def _epoch_steps(loader, cfg: TrainConfig) -> int:
    """The batches one epoch takes from ``loader``: all of them, or ``cfg.max_steps_per_epoch``."""
    return len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)


def _seed_epoch(loader, cfg: TrainConfig, epoch: int) -> None:
    """Seed epoch ``epoch`` (0-based) of a run: a rerun or a resume replays the same batches."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    torch.manual_seed(cfg.seed * 1000 + epoch)


def _write_metrics(path: Path, history: List[dict]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in history))


def _data_size(loader) -> str:
    try:
        return f"{len(loader.sampler if getattr(loader, 'sampler', None) is not None else loader.dataset)} samples"
    except TypeError:
        return "an unsized dataset"


def check_finite(model: nn.Module, when: str, fix: str) -> None:
    """Raise ``FloatingPointError`` naming the first parameter or buffer (BatchNorm statistics
    included) that holds NaN or Inf: a diverged run must stop, not be saved as a result."""
    for name, value in _unwrap(model).state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            kind = "BatchNorm statistic" if name.rpartition(".")[2].startswith("running_") else "parameter"
            raise FloatingPointError(f"training diverged: {kind} {name} holds NaN or Inf {when} (nothing of this "
                                     f"epoch is saved); {fix}")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, channels_last: bool = False,
             max_batches: Optional[int] = None,
             forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean loss over ``loader``, summed across ranks, in
    float32. ``forward`` runs the model (default: the module itself; a compiled one, which must
    wrap the module, not a DDP wrapper).

    Under DDP each rank evaluates its own shard of ``loader`` with the unwrapped module (no
    collective per batch, so shards may differ in length); the sums are then all-reduced.
    """
    model = _unwrap(model)
    model.eval()
    forward = model if forward is None else forward
    stats = torch.zeros(5, dtype=torch.float64)  # loss, top1, top5, count, images with non-finite outputs
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = forward(x).float()
        finite = torch.isfinite(out).all(1)
        stats[4] += (~finite).sum().item()
        out = torch.where(finite.unsqueeze(1), out, 0.0)  # counted above; the sums stay finite
        k = min(5, out.shape[1])
        top = out.topk(k, 1).indices
        stats[0] += F.cross_entropy(out, y, reduction="sum").item()
        stats[1] += (top[:, 0] == y).sum().item()
        stats[2] += (top == y[:, None]).any(1).sum().item()
        stats[3] += y.numel()
    if is_distributed():
        # NOTE: nccl reduces device tensors only; gloo takes CPU ones.
        on_device = stats.to(device) if dist.get_backend() == "nccl" else stats
        dist.all_reduce(on_device)
        stats = on_device.cpu()
    if stats[4] > 0:
        raise FloatingPointError(f"the model's outputs hold NaN or Inf for {int(stats[4])} of {int(stats[3])} "
                                 "images: its weights or BatchNorm statistics are not finite (a diverged training "
                                 "run?); use another checkpoint")
    n = max(stats[3].item(), 1)
    return {"loss": stats[0].item() / n, "top1": 100 * stats[1].item() / n,
            "top5": 100 * stats[2].item() / n, "count": int(stats[3].item())}


def save_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        epoch: int, history: List[dict], extra: Optional[dict] = None,
                        scaler: Optional[torch.amp.GradScaler] = None,
                        average: Optional[Dict[str, torch.Tensor]] = None, average_count: int = 0) -> None:
    """Write model + optimizer + RNG (+ AMP scaler, + weight average of ``average_count``
    epochs) state as safetensors with JSON metadata (no pickle)."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    if average_count:
        tensors.update({f"average.{k}": v.contiguous() for k, v in (average or {}).items()})
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{pid}.{key}"] = val.contiguous().cpu()
    tensors["rng.cpu"] = torch.get_rng_state()
    meta = {"epoch": epoch, "history": history, "param_groups": opt["param_groups"], "extra": extra or {},
            "average_count": average_count}
    if scaler is not None and scaler.is_enabled():
        meta["grad_scaler"] = {k: float(v) if torch.is_tensor(v) else v for k, v in scaler.state_dict().items()}
    save_safetensors(tensors, path, {"kse_training_state": json.dumps(meta)})


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: Optional[torch.amp.GradScaler] = None,
                        average: Optional[Dict[str, torch.Tensor]] = None) -> dict:
    """Restore what :func:`save_training_state` wrote; returns its metadata. ``average``, when
    given, is filled with the weight average the file holds (validated against ``model``; its
    ``average_count`` is in the metadata, 0 when it holds none)."""
    from safetensors import safe_open

    fix = "delete it, or run without --resume to start over"
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("kse_training_state")
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends: truncated or not safetensors
        raise ValueError(f"{path} is not a readable training checkpoint ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}); {fix}") from None
    if raw is None:
        raise ValueError(f"{path} is not a kse training checkpoint (no kse_training_state metadata); {fix}")
    meta = json.loads(raw)
    try:
        _unwrap(model).load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as exc:  # missing / unexpected keys, other shapes: another model's run
        first = " ".join(str(exc).split())
        raise ValueError(f"{path} holds the state of another model (written by a run with another "
                         f"architecture or compression: {first[:300]}); use another --out, or {fix}") from None
    state: Dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if scaler is not None and scaler.is_enabled() and "grad_scaler" in meta:
        scaler.load_state_dict(meta["grad_scaler"])
    count = meta.setdefault("average_count", 0)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= meta["epoch"] + 1:
        raise ValueError(f"{path} records {count!r} averaged epochs after epoch {meta['epoch'] + 1}, which cannot "
                         f"be; {fix}")
    if average is not None:
        average.clear()
        if count:
            average.update({k[8:]: v.float() for k, v in tensors.items() if k.startswith("average.")})
            try:
                check_average(average, _unwrap(model))
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
    return meta


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def state_digest(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every parameter and buffer, bit for bit."""
    h = hashlib.sha256()
    for name, value in _unwrap(model).state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def sync_replicas(model: nn.Module) -> List[str]:
    """Under DDP: copy rank 0's buffers to every rank, then check that all replicas agree.

    DDP keeps parameters in step, but BatchNorm running statistics are updated from each
    rank's own batch after DDP's pre-forward broadcast, so at the end of an epoch they
    differ slightly. Broadcasting them makes every rank hold what rank 0 saves. Returns the
    per-rank :func:`state_digest` and raises ``RuntimeError`` when the replicas disagree.
    """
    module = _unwrap(model)
    for buf in module.buffers():
        dist.broadcast(buf, src=0)
    digests: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, state_digest(module))
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP replicas diverged: per-rank weight digests {digests}; "
                           "check that every rank runs the same code, model and seed")
    return [str(d) for d in digests]


class CompileError(RuntimeError):
    """``torch.compile`` cannot compile the training step here (no C++ compiler for the CPU, no
    Triton for CUDA), or failed to."""


_NO_COMPILE = "train without compiling (no --compile, TrainConfig(compile=False))"


def check_compile(device: torch.device) -> None:
    """Raise :class:`CompileError` where ``torch.compile`` has nothing to compile with on
    ``device``: no C++ compiler (CPU; inductor's own search, ``$CXX`` included), no Triton
    (CUDA). Passing does not promise that compilation succeeds."""
    try:
        if device.type == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        elif device.type == "cuda":
            from torch.utils._triton import has_triton

            if not has_triton():
                raise CompileError(f"torch.compile needs Triton on CUDA, which is not installed; {_NO_COMPILE}")
    except (ImportError, AttributeError):  # torch moved its helpers: compilation will say what is missing
        return
    except CompileError:
        raise
    except Exception as exc:  # noqa: BLE001 - InvalidCxxCompiler and friends
        raise CompileError(f"torch.compile needs a C++ compiler on the CPU and found none ({type(exc).__name__}; "
                           f"install g++ or set $CXX); {_NO_COMPILE}") from None


def _compile_failure(exc: BaseException, what: str = "the training step") -> Optional[CompileError]:
    """The :class:`CompileError` for an exception of a compiled step (``what``: the training
    step, the evaluation), or ``None`` when it is not a compilation failure (raised again as it is)."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

    inner = exc.inner_exception if isinstance(exc, BackendCompilerFailed) else exc
    if not isinstance(exc, BackendCompilerFailed) and not isinstance(inner, (CppCompileError, InvalidCxxCompiler)):
        return None
    cause = f"{type(inner).__name__}: {' '.join(str(inner).split())[:200]}"
    if isinstance(inner, (CppCompileError, InvalidCxxCompiler)):
        return CompileError(f"torch.compile could not build {what}'s C++ code ({cause}); it needs a "
                            f"working C++ compiler; {_NO_COMPILE}")
    return CompileError(f"torch.compile failed on {what} ({cause}); {_NO_COMPILE}")


@contextlib.contextmanager
def _compile_errors(compiled: bool, what: str = "the training step"):
    """Raise a compilation failure of a compiled step (``what``) as one :class:`CompileError`; any
    other exception (or any at all when nothing is ``compiled``) as it is."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - a compilation failure (forward or backward) is one CompileError
        failure = _compile_failure(exc, what) if compiled else None
        if failure is None:
            raise
        raise failure from None


def fit(model: nn.Module, train_loader, test_loader, cfg: TrainConfig, out_dir: Path,
        device: torch.device, resume: bool = False,
        on_epoch_end: Optional[Callable[[int, Dict[str, float]], None]] = None) -> List[dict]:
    """Train for ``cfg.epochs`` epochs, evaluating and checkpointing after each one.

    Returns the per-epoch metrics. ``model`` may already be wrapped in DDP.
    """
    out_dir = Path(out_dir)
    optimizer = build_optimizer(_unwrap(model), cfg)
    scaler = torch.amp.GradScaler("cuda") if (cfg.amp and device.type == "cuda") else None
    ckpt = out_dir / "last.ckpt"
    start, history = 0, []
    metrics = out_dir / "metrics.jsonl"
    average: Dict[str, torch.Tensor] = {}  # the running mean of the weights (cfg.swa_from)
    average_count = 0
    if resume and ckpt.is_file():
        meta = load_training_state(ckpt, model, optimizer, scaler, average)
        start, history = meta["epoch"] + 1, meta["history"]
        average_count = meta["average_count"]
        expected = 0 if cfg.swa_from is None else max(0, start - cfg.swa_from + 1)
        if average_count != expected:
            raise ValueError(f"{ckpt} holds a weight average of {average_count} epochs, but --swa-from "
                             f"{cfg.swa_from} after {start} epochs makes {expected}: it was written with another "
                             "--swa-from; resume with the same one, or start over in a new --out")
        if is_main_process():
            # the checkpoint holds every epoch's row: a stop after it was written but before the
            # metrics were does not lose a line
            _write_metrics(metrics, history)
            print(f"resumed from {ckpt} at epoch {start}", file=sys.stderr)
    elif resume and is_main_process():
        print(f"resume: no {ckpt} yet; starting at epoch 0", file=sys.stderr)
    forward = eval_forward = None
    if cfg.compile and start < cfg.epochs:
        check_compile(device)
        if is_main_process():
            print("compiling the training step (torch.compile): the first steps wait for it; the first evaluation "
                  "waits for its own", file=sys.stderr, flush=True)
        forward = torch.compile(model)
        # evaluation runs the module (not a DDP wrapper) in eval mode: a graph of its own
        eval_forward = forward if model is _unwrap(model) else torch.compile(_unwrap(model))
    for epoch in range(start, cfg.epochs):
        _seed_epoch(train_loader, cfg, epoch)
        t0 = time.time()
        row = {"epoch": epoch + 1}
        with _compile_errors(forward is not None):
            row.update(train_one_epoch(model, train_loader, optimizer, cfg, epoch, device, scaler, forward))
        if is_distributed():
            row["replica_digests"] = sync_replicas(model)
        with _compile_errors(eval_forward is not None, "the evaluation"):
            test = evaluate(model, test_loader, device, cfg.channels_last, forward=eval_forward)
        row.update({f"test_{k}": v for k, v in test.items()})
        row["epoch_s"] = time.time() - t0
        history.append(row)
        if cfg.swa_from is not None and epoch + 1 >= cfg.swa_from:
            accumulate_(average, _unwrap(model), average_count)
            average_count += 1
        if is_main_process():
            print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} "
                  f"top1 {row['train_top1']:.2f}% | test top1 {row['test_top1']:.2f}% "
                  f"top5 {row['test_top5']:.2f}% | {row['epoch_s']:.0f}s", file=sys.stderr, flush=True)
            save_training_state(ckpt, model, optimizer, epoch, history, {"train_config": asdict(cfg)}, scaler,
                                average, average_count)
            _write_metrics(metrics, history)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
    if cfg.swa_from is not None:
        with _compile_errors(eval_forward is not None, "the evaluation"):
            last = _finish_average(model, average, average_count, train_loader, test_loader, cfg, device, eval_forward)
        history = history + [last]
        if is_main_process():
            _write_metrics(metrics, history)
    return history


def _finish_average(model: nn.Module, average: Dict[str, torch.Tensor], count: int, train_loader, test_loader,
                    cfg: TrainConfig, device: torch.device,
                    forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, float]:
    """Give ``model`` the weight average of the last ``count`` epochs, re-estimate its
    BatchNorm statistics over one pass of ``train_loader`` (as ``torch.optim.swa_utils.update_bn``;
    the averaged weights belong to none of the statistics seen so far) and evaluate it (with
    ``forward``, as :func:`evaluate`). Returns
    the metrics row: ``epoch`` (the last), ``swa_epochs`` (``count``) and the ``test_*`` values."""
    from .recalibrate import batchnorm_layers, recalibrate_bn_

    t0 = time.time()
    what = f"weight average of epochs {cfg.epochs - count + 1}-{cfg.epochs}"
    module = _unwrap(model)
    load_average_(module, average)
    if batchnorm_layers(module):
        steps = _epoch_steps(train_loader, cfg)
        _seed_epoch(train_loader, cfg, cfg.epochs)  # the pass after the last epoch, the same on a resume
        if is_main_process():
            print(f"{what}: re-estimating BatchNorm statistics over {steps} training batches (forward passes "
                  "only)", file=sys.stderr, flush=True)
        with _autocast(cfg, device):  # the precision the training steps' statistics came from
            recalibrate_bn_(module, train_loader, batches=steps)
    check_finite(model, "after averaging the weights", "start over with a lower learning rate (--lr)")
    row: Dict[str, float] = {"epoch": cfg.epochs, "swa_epochs": count}
    if is_distributed():
        row["replica_digests"] = sync_replicas(model)
    row.update({f"test_{k}": v for k, v in evaluate(model, test_loader, device, cfg.channels_last,
                                                     forward=forward).items()})
    row["epoch_s"] = time.time() - t0
    if is_main_process():
        print(f"{what}: test top1 {row['test_top1']:.2f}% "
              f"top5 {row['test_top5']:.2f}% | {row['epoch_s']:.0f}s", file=sys.stderr, flush=True)
    return row


def finetune_steps(model: nn.Module, train_loader, steps: int, lr: float, device: torch.device,
                   seed: int = 0) -> Dict[str, object]:
    """A short fine-tuning run of about ``steps`` SGD steps, as ``kse demo`` runs it: the
    optimizer of the KSE paper's fine-tuning (Li et al., CVPR 2019: momentum 0.9, weight decay
    1e-5) with the rate x0.1 at half the run, over whole epochs of at most ``ceil(steps / epochs)`` batches each. Returns a
    summary (``steps``, ``epochs``, ``lr``, ``weight_decay``, ``batch_size``, ``schedule``,
    ``train_loss`` of the last epoch)."""
    per_epoch = len(train_loader)
    if per_epoch == 0:
        raise ValueError("the training split is smaller than one batch; lower the batch size")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    epochs = max(1, math.ceil(steps / per_epoch))
    per_epoch_steps = math.ceil(steps / epochs)
    cfg = TrainConfig(epochs=epochs, lr=lr, momentum=0.9, weight_decay=1e-5, batch_size=train_loader.batch_size,
                      schedule="multistep", milestones=[0.5], gamma=0.1, seed=seed, channels_last=False,
                      max_steps_per_epoch=per_epoch_steps)
    optimizer = build_optimizer(model, cfg)
    rows = []
    for epoch in range(epochs):
        _seed_epoch(train_loader, cfg, epoch)
        rows.append(train_one_epoch(model, train_loader, optimizer, cfg, epoch, device))
    return {"steps": epochs * min(per_epoch_steps, per_epoch), "epochs": epochs, "lr": cfg.lr,
            "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size, "schedule": "multistep, x0.1 at half",
            "train_loss": rows[-1]["train_loss"]}
