"""The fused kernel of this tree against the one of another git revision, layer by layer, in one
process (CPU). Both sources (``src/kse/csrc``) are compiled under their own names and operator
namespaces; each layer of a compressed checkpoint runs with both, on the inputs it sees in the
model, in alternating rounds (the order reversed every round), and each keeps its best time. Outputs are compared first (1e-4 relative).
An A/A run (``--against`` the working tree's own commit, unchanged kernel) shows the harness's
noise. ``--against-chunk-rows R`` compares instead with this tree's kernel given chunks of R
centroid rows (``kse.fused.chunk_rows`` chooses them). Instead of a checkpoint,
``--resnet50 --G 5 --T 1`` compresses torchvision's ResNet-50 (random weights, 224x224).

    python benchmarks/kernel_ab.py --checkpoint checkpoints/resnet56-fmnist-g4.kse \\
        --against HEAD~1 --batch-size 64 [--rounds 4] [--threads 2] [--layers PAT] [--channels-last]
    python benchmarks/kernel_ab.py --resnet50 --G 5 --T 1 --against-chunk-rows 128 --batch-size 16

Prints one JSON object: per layer and per stage (first part of the layer name) the two times
and ``speedup`` = against / this tree.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import torch

import kse
from kse import fused
from kse.conv import KSEConv2d
from kse.report import capture_layer_inputs

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "src" / "kse" / "csrc"


def kernel_sources(revision: Optional[str]) -> Dict[str, str]:
    """The C++ files of the extension (``src/kse/csrc``) at a git revision, or in the working
    tree (``None``); for revisions from before that folder, the ``_SOURCE`` string of
    ``src/kse/fused.py``."""
    if revision is None:
        return {p.name: p.read_text() for p in CSRC.iterdir() if p.suffix in (".cpp", ".h")}

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, check=True, capture_output=True, text=True).stdout

    names = [n for n in git("ls-tree", "--name-only", revision, "src/kse/csrc/").split() if n.endswith((".cpp", ".h"))]
    if names:
        return {Path(n).name: git("show", f"{revision}:{n}") for n in names}
    text = git("show", f"{revision}:src/kse/fused.py")
    start = text.index('_SOURCE = r"""') + len('_SOURCE = r"""')
    return {"fused.cpp": text[start:text.index('"""', start)]}


def build(name: str, files: Dict[str, str]):
    """Compile kernel sources as their own extension and operator namespace ``name`` (a process
    can hold only one ``TORCH_LIBRARY(kse, ...)``); the module's ``fused_conv`` runs the kernel."""
    from torch.utils.cpp_extension import load

    folder = Path(tempfile.mkdtemp(prefix=name))
    for file, text in files.items():
        text = (text.replace("TORCH_LIBRARY(kse,", f"TORCH_LIBRARY({name},")
                .replace("TORCH_LIBRARY_IMPL(kse,", f"TORCH_LIBRARY_IMPL({name},")
                .replace('"kse::', f'"{name}::').replace('m.set_python_module("kse.ops");', ""))
        (folder / file).write_text(text)
    return load(name=name, sources=[str(p) for p in sorted(folder.glob("*.cpp"))], extra_include_paths=[str(folder)],
                is_python_module=True, extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"],
                extra_ldflags=["-fopenmp"])


def best_of(fn, x, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a compressed .kse file")
    source.add_argument("--resnet50", action="store_true", help="torchvision ResNet-50, random weights, compressed")
    ap.add_argument("--G", type=int, default=5, help="with --resnet50")
    ap.add_argument("--T", type=int, default=1, help="with --resnet50")
    ap.add_argument("--layers", default="*", help="glob of the layer names to time (default: all)")
    against = ap.add_mutually_exclusive_group()
    against.add_argument("--against", default="HEAD~1", help="git revision whose kernel to compare with")
    against.add_argument("--against-chunk-rows", type=int, default=None, metavar="R",
                         help="compare with this tree's kernel and chunks of R centroid rows")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--channels-last", action="store_true",
                    help="give each layer its input in channels_last (the kernel answers channels_last)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    this = build("kse_ab_this", kernel_sources(None))
    if args.against_chunk_rows is not None:
        rev = f"chunk_rows={args.against_chunk_rows}"
        kernels = {"this": this, "against": this}
    else:
        rev = subprocess.run(["git", "rev-parse", "--short", args.against], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.strip()
        kernels = {"this": this, "against": build(f"kse_ab_{rev}", kernel_sources(rev))}
    torch.manual_seed(0)
    if args.resnet50:
        import torchvision

        size = (3, 224, 224)
        model = kse.compress(torchvision.models.resnet50().eval(), kse.KSEConfig(G=args.G, T=args.T, input_size=size))
    else:
        model = kse.load(args.checkpoint)
        size = tuple(model.kse_preprocess["input_size"])
    model.eval()
    names = [n for n, m in model.named_modules()
             if isinstance(m, KSEConv2d) and fused.supports(m) and fnmatch.fnmatch(n, args.layers)]
    inputs = capture_layer_inputs(model, names, torch.randn(args.batch_size, *size))
    repeats = 10 if args.batch_size > 8 else 50
    layers, stages = [], {}
    with torch.no_grad():
        for name in names:
            layer, x = model.get_submodule(name), inputs[name]
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            prepared = {"this": fused.prepare(layer), "against": fused.prepare(layer, args.against_chunk_rows)}
            call = {k: (lambda x, m=m, t=prepared[k]: m.fused_conv(
                        x, t["kept"], t["cents"], t["offsets"], t["assign"], t["scale"], t["bias"], t["chunks"],
                        *layer.kernel_size, *layer.padding, t["relu"]))
                    for k, m in kernels.items()}
            ref = call["against"](x)
            torch.testing.assert_close(call["this"](x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
            best = dict.fromkeys(call, float("inf"))
            for r in range(args.rounds):
                for k in (list(call) if r % 2 == 0 else list(call)[::-1]):
                    call[k](x)
                    best[k] = min(best[k], best_of(call[k], x, repeats))
            row = {"layer": name, "shape": list(x.shape), "kernel_size": list(layer.kernel_size),
                   "out_channels": layer.out_channels, "this_ms": round(best["this"] * 1e3, 4),
                   "against_ms": round(best["against"] * 1e3, 4), "speedup": round(best["against"] / best["this"], 3)}
            layers.append(row)
            stage = stages.setdefault(name.split(".")[0], {"this_ms": 0.0, "against_ms": 0.0})
            stage["this_ms"] += row["this_ms"]
            stage["against_ms"] += row["against_ms"]
    for stage in stages.values():
        stage["speedup"] = round(stage["against_ms"] / stage["this_ms"], 3)
        stage["this_ms"], stage["against_ms"] = round(stage["this_ms"], 3), round(stage["against_ms"], 3)
    this, against = sum(r["this_ms"] for r in layers), sum(r["against_ms"] for r in layers)
    print(json.dumps({"benchmark": "kernel_ab", "against": rev, "batch_size": args.batch_size,
                      "channels_last": args.channels_last,
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "total": {"this_ms": round(this, 3), "against_ms": round(against, 3),
                                "speedup": round(against / this, 3)},
                      "stages": stages, "layers": layers}, indent=1))


if __name__ == "__main__":
    main()
