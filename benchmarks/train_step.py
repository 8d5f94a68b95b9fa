"""Time one training step (forward, backward, SGD update) of a dense CIFAR network and of its
KSE-compressed version, in float32 and under CPU bfloat16 autocast, measured in interleaved
rounds in one run (the order reversed every other round); with ``--compile``, also each model
under ``torch.compile`` (what ``kse train/finetune --compile`` runs), its compilation timed apart.
With ``--eval``, the same for the evaluation's forward pass instead (eval mode, no gradients),
which ``kse train/finetune`` runs after every epoch, compiled with ``--compile``.

    python benchmarks/train_step.py [--checkpoint checkpoints/resnet56-fmnist.kse] [--G 4] [--batch-size 128]
    python benchmarks/train_step.py --arch densenet40 --G 6 --exclude features.1.conv features.3.conv \
        --layout nchw --precisions bf16 --compile
    python benchmarks/train_step.py --arch densenet40 --G 6 --exclude features.1.conv features.3.conv \
        --layout nchw --precisions fp32 --compile --eval --batch-size 256

Prints one JSON object: median step time and images/s per (model, precision), and the ratio
compressed / dense (issue: a training step of the compressed model must be no slower).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import kse
import kse.training_weight
import kse.fused
from kse.models import get_model


def step_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool, steps: int,
              forward=None, evaluate: bool = False) -> float:
    """The median time of ``steps`` training steps (with ``evaluate``: forward passes in eval
    mode without gradients) after one untimed one; ``forward`` runs the model (default:
    ``model`` itself; a compiled one)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    forward = model if forward is None else forward
    model.train(not evaluate)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        sync()
        t = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp), torch.set_grad_enabled(not evaluate):
            loss = F.cross_entropy(forward(x), y)
        if not evaluate:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def profile_steps(models: dict, x: torch.Tensor, y: torch.Tensor, rows: int = 12) -> None:
    """Print the operators that take the most time in two steps of each model (stderr)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    key = "self_cuda_time_total" if x.is_cuda else "self_cpu_time_total"
    for name, model in models.items():
        if name.endswith("_compiled"):  # the profiler would run them eager: left out
            continue
        kse.training_weight.configure_training(extension=not name.endswith("_stock"))
        step_time(model, x, y, False, 1)  # warm
        with profile(activities=acts) as prof:
            step_time(model, x, y, False, 2)
        print(f"== {name}: top operators by {key}", file=sys.stderr)
        print(prof.key_averages().table(sort_by=key, row_limit=rows), file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="a dense .kse baseline (default: a random --arch)")
    ap.add_argument("--arch", default="resnet56", help="the random model without --checkpoint (1x28x28 input)")
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--exclude", nargs="*", default=[], help="KSEConfig.exclude: layers left dense")
    ap.add_argument("--layout", choices=["channels_last", "nchw"], default="channels_last")
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true", help="also time every model under torch.compile")
    ap.add_argument("--eval", action="store_true", help="time evaluation forward passes (eval mode, no gradients) "
                    "instead of training steps")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--channel-multiple", type=int, default=8, help="KSEConfig.channel_multiple (1: odd widths)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bfloat16 autocast on both)")
    ap.add_argument("--profile", action="store_true", help="also print each model's top operators (torch.profiler) to stderr")
    ap.add_argument("--stock-weight", action="store_true",
                    help="also time the compressed model with W' built by stock operations instead of the compiled "
                         "extension (kse.training_weight.configure_training(extension=False)), as model kse_g<G>_stock")
    ap.add_argument("--select-max-kept", type=float, default=None,
                    help="kse.training_weight.configure_training(select_max_kept=...): fraction of kept channels above which training "
                         "convolves all channels with zero kernels instead of gathering the kept ones")
    args = ap.parse_args()
    if args.profile and args.eval:
        ap.error("--profile times training steps; leave it out with --eval")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.select_max_kept is not None:
        kse.training_weight.configure_training(select_max_kept=args.select_max_kept)
    if args.checkpoint:
        dense = kse.load(args.checkpoint)
        size = tuple(dense.kse_preprocess["input_size"])
    else:
        torch.manual_seed(0)
        dense, size = get_model(args.arch, num_classes=10, in_channels=1), (1, 28, 28)
    compressed = kse.compress(dense, kse.KSEConfig(G=args.G, input_size=size, channel_multiple=args.channel_multiple,
                                                   exclude=args.exclude))
    models = {"dense": dense, f"kse_g{args.G}": compressed}
    if args.stock_weight:
        models[f"kse_g{args.G}_stock"] = copy.deepcopy(compressed)
    layout = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    for m in models.values():
        m.to(device=args.device, memory_format=layout)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, *size, generator=g).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    x, y = x.to(args.device), y.to(args.device)
    precisions = [p == "bf16" for p in ("fp32", "bf16") if p in args.precisions]
    forwards, compile_s = {name: None for name in models}, {}
    if args.compile:  # a copy of each model, compiled (and recompiled per precision) before any timing
        for name in [n for n in models if not n.endswith("_stock")]:  # compiled steps trace stock operations
            models[f"{name}_compiled"] = copy.deepcopy(models[name])
            forwards[f"{name}_compiled"] = torch.compile(models[f"{name}_compiled"])
            for amp in precisions:
                t = time.perf_counter()
                step_time(models[f"{name}_compiled"], x, y, amp, 1, forwards[f"{name}_compiled"], args.eval)
                compile_s[f"{name}_{'bf16' if amp else 'fp32'}"] = round(time.perf_counter() - t, 1)
    samples = {(name, amp): [] for name in models for amp in precisions}
    for r in range(args.rounds):  # the order reversed every round: a fixed order favoured some entries by ~5%
        for (name, amp) in (list(samples) if r % 2 == 0 else list(samples)[::-1]):
            kse.training_weight.configure_training(extension=not name.endswith("_stock"))
            samples[(name, amp)].append(step_time(models[name], x, y, amp, args.steps, forwards[name], args.eval))
    if args.profile:
        profile_steps(models, x, y)
    result = {"benchmark": "eval_forward" if args.eval else "train_step", "batch_size": args.batch_size, "input_size": list(size),
              "checkpoint": args.checkpoint, "arch": None if args.checkpoint else args.arch, "exclude": args.exclude,
              "layout": args.layout, "compile_s": compile_s or None, "G": args.G,
              "channel_multiple": args.channel_multiple, "device": args.device,
              "select_max_kept": kse.training_weight.configure_training()["select_max_kept"],
              "weight_built_by": ("stock operations (not on the CPU)" if args.device != "cpu" else "extension"
                                  if kse.fused.available() else f"stock operations ({kse.fused.build_error()})")}
    for (name, amp), ts in samples.items():
        key = f"{name}_{'bf16' if amp else 'fp32'}"
        med = statistics.median(ts)
        result[f"{key}_step_ms"] = round(1e3 * med, 2)
        result[f"{key}_img_per_s"] = round(args.batch_size / med, 1)
    for prec in args.precisions:
        for name in models:
            if name != "dense" and not name.endswith("_compiled"):
                result[f"step_ratio_{name.replace(f'_g{args.G}', '')}_over_dense_{prec}"] = round(
                    result[f"{name}_{prec}_step_ms"] / result[f"dense_{prec}_step_ms"], 3)
            if name.endswith("_compiled"):
                eager = name[:-len("_compiled")]
                short = eager.replace(f"_g{args.G}", "")
                result[f"compile_speedup_{short}_{prec}"] = round(
                    result[f"{eager}_{prec}_step_ms"] / result[f"{name}_{prec}_step_ms"], 3)
                if eager != "dense":
                    result[f"step_ratio_{short}_compiled_over_dense_compiled_{prec}"] = round(
                        result[f"{name}_{prec}_step_ms"] / result[f"dense_compiled_{prec}_step_ms"], 3)
    if len(precisions) == 2:
        result["bf16_speedup_dense"] = round(result["dense_fp32_step_ms"] / result["dense_bf16_step_ms"], 3)
    result.update(torch_threads=torch.get_num_threads(), machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
                  device_name=torch.cuda.get_device_name() if x.is_cuda else platform.processor(),
                  torch=torch.__version__)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
