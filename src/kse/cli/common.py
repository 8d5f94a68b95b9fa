"""What every ``kse`` command shares: the parser class, the common flags with one spelling
everywhere, ``--config`` resolution, the one-line error handling, and helpers that load
checkpoints and data for a command.

A command module (``kse/cli/<group>.py``) calls :func:`add_command` once per command and adds
its flags with :func:`add_common` and ``parser.add_argument``; :func:`run_command` resolves the
arguments and turns every expected error into one line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..train import CompileError

EXPECTED_ERRORS = (ValueError, TypeError, OSError, FloatingPointError, KeyError, CompileError)


class CLIError(Exception):
    """An expected error, printed as one line."""


# ----------------------------------------------------------------------------- parsers
class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that records what is added to it, so that nothing needs argparse's
    private attributes: ``flags`` maps each destination to its action, ``commands`` each
    subcommand's name to its parser (on the top-level parser), ``defaults`` the values that
    fill flags left unset by both the command line and ``--config``, ``folder_out`` whether
    the command's ``--out`` is a folder."""

    def __init__(self, *args, **kwargs) -> None:
        self.flags: Dict[str, argparse.Action] = {}
        self.commands: Dict[str, "CommandParser"] = {}
        self.defaults: Dict[str, Any] = {}
        self.folder_out = False
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.flags[action.dest] = action
        return action

    def error(self, message: str):
        """A bad command line: one line and exit status 2, as every other expected error."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def finite_float(text: Any) -> float:
    """argparse type of every real-valued flag: a number that is neither NaN nor infinite."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text: Any) -> int:
    """argparse type of a size flag: an integer >= 1."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1 or (isinstance(text, float) and text != value):
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


_CHECKED_TYPES = (finite_float, positive_int)


def add_command(subparsers, name: str, func: Callable[[argparse.Namespace], int], defaults: Dict[str, Any],
                folder_out: bool = False, config: bool = True, **kwargs) -> CommandParser:
    """Add subcommand ``name`` running ``func(args)``; ``defaults`` fill flags left unset by the
    command line and ``--config``; ``folder_out``: its ``--out`` is a folder (else one file);
    ``config``: add ``--config FILE.yaml``. ``kwargs`` go to ``add_parser`` (``help``,
    ``description``, ...). Returns the subcommand's parser, for its own flags."""
    p = subparsers.add_parser(name, **kwargs)
    if config:
        p.add_argument("--config", default=None, help="YAML file whose keys set this command's defaults")
    p.defaults = dict(defaults)
    p.folder_out = folder_out
    p.set_defaults(func=func)
    return p


_COMMON_FLAGS = {
    "arch": dict(default=None, help="model name (see `kse models`); default: from --checkpoint, else resnet56"),
    "dataset": dict(default=None, help="dataset name (default: fashion-mnist, or the checkpoint's)"),
    "data-dir": dict(default=None, help="where the dataset lives (default: $KSE_DATA, then system paths)"),
    "checkpoint": dict(default=None, help="a .kse file to start from"),
    "out": dict(default=None, help="output file or folder"),
    "G": dict(type=int, default=None, help="KSE groups G (>= 2; default 4)"),
    "T": dict(type=int, default=None, help="KSE shift T (>= 0; default 0)"),
    "alpha": dict(type=finite_float, default=None, help="entropy weight alpha (>= 0; default 1)"),
    "epochs": dict(type=int, default=None, help="number of epochs"),
    "lr": dict(type=finite_float, default=None, help="peak learning rate"),
    "batch-size": dict(type=int, default=None, help="batch size per process"),
    "device": dict(default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"),
    "seed": dict(type=int, default=None, help="random seed (default 0)"),
    # training (kse train, kse finetune)
    "workers": dict(type=int, default=None, help="data-loader worker processes"),
    "amp": dict(action="store_true", default=None,
                help="mixed precision: float16 with loss scaling on CUDA, bfloat16 on CPU"),
    "channels-last": dict(action=argparse.BooleanOptionalAction, default=None),
    "compile": dict(action="store_true", default=None,
                    help="torch.compile the training step and the evaluation: faster after a compilation that "
                         "takes a minute or more the first time (torch caches it on disk); needs a C++ compiler "
                         "on the CPU"),
    "resume": dict(action="store_true", default=None, help="continue from OUT/last.ckpt"),
    "max-steps": dict(type=int, default=None, help="cap steps per epoch (quick runs)"),
    "swa-from": dict(type=int, default=None, metavar="EPOCH",
                     help="stochastic weight averaging: end with the mean of the weights of epochs EPOCH to the last "
                          "(BatchNorm statistics re-estimated on the training data, one more metrics row); "
                          "default: the last epoch's weights"),
    "fake-size": dict(type=int, default=None, help="FakeData train size"),
}


def add_common(p: argparse.ArgumentParser, *names: str) -> None:
    """Add the flags shared by several subcommands, with one spelling everywhere."""
    for n in names:
        p.add_argument(f"--{n}", **_COMMON_FLAGS[n])


# ----------------------------------------------------------------------------- running a command
def resolve(args: argparse.Namespace, parser: CommandParser) -> argparse.Namespace:
    """Fill unset flags from ``--config`` (YAML), then from the command's defaults."""
    cfg: Dict[str, Any] = {}
    if getattr(args, "config", None):
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise CLIError(f"config file not found: {path}")
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise CLIError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from None
        if not isinstance(cfg, dict):
            raise CLIError(f"config file {path} must hold a mapping of flag names to values")
        for key, value in cfg.items():
            action = parser.flags.get(key.replace("-", "_"))
            if action is None:
                raise CLIError(f"config file {path}: unknown key {key!r}")
            if action.type in _CHECKED_TYPES and value is not None:  # YAML can say .nan or .inf
                for v in value if isinstance(value, list) else [value]:
                    try:
                        action.type(v)
                    except argparse.ArgumentTypeError as exc:
                        raise CLIError(f"config file {path}: {key} {exc}") from None
    for key, value in {**parser.defaults, **{k.replace("-", "_"): v for k, v in cfg.items()}}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def _warning_printer(command: str, fallback: Callable):
    """``warnings.showwarning`` for a command: kse's own warnings as one line,
    ``kse COMMAND: warning: message``; other libraries' as Python prints them."""
    package = str(Path(__file__).resolve().parents[1])

    def show(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(package):
            print(f"kse {command}: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


def run_command(parser: CommandParser, args: argparse.Namespace) -> int:
    """Run the parsed subcommand: expected errors print one line and return 2, an interrupt
    130, anything else one line and 1 (with ``KSE_DEBUG=1`` the traceback instead)."""
    try:
        sub = parser.commands[args.command]
        resolve(args, sub)
        if getattr(args, "out", None):
            check_out(Path(args.out), sub.folder_out)
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(args.command, warnings.showwarning)
            return args.func(args) or 0
    except CLIError as exc:
        print(f"kse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except EXPECTED_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if isinstance(exc, OSError) and exc.strerror:  # without "[Errno 28]"
            msg = exc.strerror + (f": {exc.filename}" if exc.filename else "")
        msg = " ".join(str(msg).split("\n"))  # one line, whatever the library wrote
        print(f"kse {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kse {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - unexpected: one line, the traceback on request
        if os.environ.get("KSE_DEBUG", "") not in ("", "0"):
            raise
        text = " ".join(str(exc).split())
        print(f"kse {args.command}: error: {type(exc).__name__}: {text[:500]} (unexpected; KSE_DEBUG=1 shows "
              "the traceback)", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------- values
def parse_device(name: Optional[str]) -> torch.device:
    """``--device``: a ``torch.device``, CUDA when available by default."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device: unknown device {name!r}; use cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def set_threads(n: Optional[int]) -> None:
    if n is not None:
        at_least("--threads", n, 1)
        torch.set_num_threads(n)


def at_least(flag: str, value: Optional[int], low: int) -> None:
    if value is not None and value < low:
        raise CLIError(f"{flag} must be >= {low}, got {value}")


_KSE_FLAGS = {"G": "--G", "T": "--T", "alpha": "--alpha", "seed": "--seed", "include": "--include",
              "score": "--score", "entropy_layout": "--entropy-layout", "channel_multiple": "--channel-multiple",
              "exclude": "--exclude", "n_init": "--n-init", "input_size": "--checkpoint's input size"}


def kse_config(args: argparse.Namespace, input_size: Optional[tuple] = None):
    """``KSEConfig`` from the shared flags; a bad value names its flag."""
    from ..config import KSEConfig

    kwargs = dict(G=args.G, T=args.T, alpha=args.alpha)
    for key in ("seed", "include", "exclude", "score", "entropy_layout", "channel_multiple", "n_init"):
        if getattr(args, key, None) is not None:
            kwargs[key] = getattr(args, key)
    if input_size is not None:
        kwargs["input_size"] = input_size
    try:
        return KSEConfig(**kwargs)
    except (ValueError, TypeError) as exc:
        field = str(exc).split(" ", 1)[0]
        raise CLIError(f"{_KSE_FLAGS.get(field, 'KSE config')}: {exc}") from None


# ----------------------------------------------------------------------------- files
def check_out(out: Path, folder: bool) -> None:
    """Fail before any work when ``--out`` cannot be written: it exists as the wrong kind, a
    folder on its way is a file, or the nearest existing folder is not writable."""
    if folder and out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a folder to write into")
    if not folder and out.is_dir():
        raise CLIError(f"--out {out} is a folder; give the .kse file to write (e.g. {out / 'model.kse'})")
    parent = out if folder else out.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise CLIError(f"--out {out}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise CLIError(f"--out {out}: cannot write into {p} (permission denied)")
            return


def output_file(args: argparse.Namespace, path: Path, what: str) -> Path:
    """``--out`` as a file path that does not overwrite ``--checkpoint``."""
    if not args.out:
        raise CLIError(f"--out is required: {what}")
    out = Path(args.out)
    if out.resolve() == path.resolve():
        raise CLIError("--out must differ from --checkpoint (the baseline would be overwritten)")
    return out


def save_args(args: argparse.Namespace, folder: Path, name: str = "args.json") -> None:
    """The resolved arguments as JSON beside the outputs (rank 0 only under torchrun)."""
    from ..atomic import write_text
    from ..train import is_main_process

    if is_main_process():
        data = {k: v for k, v in vars(args).items() if k != "func"}
        write_text(folder / name, json.dumps(data, indent=2, default=str) + "\n")


def save_json(path: Path, data: Any) -> None:
    from ..atomic import write_text

    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_model(args: argparse.Namespace, model: torch.nn.Module, out: Path, extra: Optional[dict]) -> None:
    """Save ``model`` to ``out`` (keeping its preprocessing) and the resolved arguments beside it
    (``model.kse`` -> ``model.args.json``)."""
    from ..serialization import save

    save(model, out, preprocess=getattr(model, "kse_preprocess", None), extra=extra)
    save_args(args, out.parent, f"{out.stem}.args.json")


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_path(args: argparse.Namespace) -> Path:
    """``--checkpoint``, checked to exist; a folder written by ``kse train`` means its model.kse."""
    if not getattr(args, "checkpoint", None):
        raise CLIError("--checkpoint is required: the .kse file to read (e.g. runs/train/model.kse)")
    path = Path(args.checkpoint)
    if path.is_dir() and (path / "model.kse").is_file():
        path = path / "model.kse"
    if not path.exists():
        raise CLIError(f"--checkpoint: file not found: {path}")
    if not path.is_file():
        raise CLIError(f"--checkpoint: {path} is a folder without a model.kse; pass the .kse file")
    return path


def load_model(path: Path, flag: str = "--checkpoint") -> torch.nn.Module:
    """``kse.load`` with a hint when the file is a training-state checkpoint, not a model;
    errors name ``flag``, the option that gave the file."""
    from ..serialization import CheckpointError, load

    try:
        return load(path)
    except CheckpointError as exc:
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                is_training_state = "kse_training_state" in (f.metadata() or {})
        except Exception:  # noqa: BLE001 - not even safetensors: keep the original message
            is_training_state = False
        if is_training_state:
            raise CLIError(f"{flag}: {path} is a training state (last.ckpt), not a model; "
                           f"pass the model.kse written next to it") from None
        raise CLIError(f"{flag}: {exc}") from None


def checkpoint_input_size(model: torch.nn.Module, path: Path) -> tuple:
    """The ``(C, H, W)`` input size recorded in the checkpoint (``kse.deploy.known_input_size``:
    its preprocessing, else the ``KSEConfig`` it was compressed with); a missing or malformed
    one is a :class:`CLIError` that says how to re-save the file."""
    from ..deploy import known_input_size

    resave = "re-save it with kse.save(..., preprocess={'input_size': [C, H, W], ...})"
    try:
        size = known_input_size(model)
    except ValueError as exc:
        raise CLIError(f"{path}: {exc}; {resave}") from None
    if size is None:
        raise CLIError(f"{path} records no input size (neither preprocess.input_size nor the input_size of the "
                       f"KSEConfig it was compressed with); {resave}")
    return size


def kse_layers(model: torch.nn.Module) -> Dict[str, Any]:
    from ..conv import KSEConv2d

    return {n: m for n, m in model.named_modules() if isinstance(m, KSEConv2d)}


def form_counts(forms: Dict[str, str]) -> Dict[str, int]:
    """How many layers run each form: ``{"split": 12, "fused": 6}``."""
    return dict(Counter(forms.values()))


# ----------------------------------------------------------------------------- data
def dataset_name(model: torch.nn.Module, args: argparse.Namespace, path: Path) -> str:
    """``--dataset``, else the dataset recorded in the checkpoint."""
    from ..data import dataset_info

    pre = getattr(model, "kse_preprocess", None) or {}
    name = getattr(args, "dataset", None) or pre.get("dataset")
    if not name:
        raise CLIError(f"{path} records no dataset; pass --dataset")
    dataset_info(name)  # unknown name -> one-line DatasetError
    return name


def check_dataset_fits(model: torch.nn.Module, info, path: Path) -> None:
    pre = getattr(model, "kse_preprocess", None) or {}
    classes, size = pre.get("num_classes"), pre.get("input_size")
    if classes and info.num_classes and classes != info.num_classes:
        raise CLIError(f"dataset {info.name!r} has {info.num_classes} classes but the model in {path} "
                       f"predicts {classes}; use the dataset it was trained on ({pre.get('dataset')!r})")
    if size and size[0] != info.in_channels:
        raise CLIError(f"dataset {info.name!r} has {info.in_channels}-channel images but the model in {path} "
                       f"reads {size[0]} channels; use the dataset it was trained on ({pre.get('dataset')!r})")


def fake_input_size(model: torch.nn.Module) -> Optional[int]:
    size = (getattr(model, "kse_preprocess", None) or {}).get("input_size")
    return int(size[1]) if size else None


def loaders(dataset: str, data_dir: Optional[str], batch_size: int, workers: int = 0, fake_size: int = 256,
            input_size: Optional[int] = None, seed: int = 0) -> Tuple[Any, Any, Any]:
    """Train and test ``DataLoader`` of ``dataset`` and its ``DatasetInfo``; under torchrun each
    process reads its own shard (``kse.distributed.samplers``)."""
    from torch.utils.data import DataLoader

    from ..data import get_dataset
    from ..distributed import samplers

    train_ds, info = get_dataset(dataset, data_dir, True, fake_size=fake_size, input_size=input_size)
    test_ds, _ = get_dataset(dataset, data_dir, False, fake_size=fake_size, input_size=input_size)
    train_sampler, test_sampler = samplers(train_ds, test_ds, seed)
    train = DataLoader(train_ds, batch_size, shuffle=train_sampler is None, sampler=train_sampler,
                       num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    test = DataLoader(test_ds, 256, shuffle=False, sampler=test_sampler, num_workers=workers)
    return train, test, info


def evaluation_loader(model: torch.nn.Module, args: argparse.Namespace, path: Path, batch_size: int = 256):
    """The test split of the checkpoint's dataset (or ``--dataset``), checked to fit the model."""
    from torch.utils.data import DataLoader

    from ..data import get_dataset

    name = dataset_name(model, args, path)
    ds, info = get_dataset(name, args.data_dir, False, fake_size=args.fake_size, input_size=fake_input_size(model))
    check_dataset_fits(model, info, path)
    return DataLoader(ds, batch_size, shuffle=False), info


# ----------------------------------------------------------------------------- progress and deployment
def stage(command: str, msg: str) -> None:
    """A progress line on stderr: ``kse COMMAND: msg``."""
    print(f"kse {command}: {msg}", file=sys.stderr, flush=True)


def busy_note(command: str) -> None:
    from ..report import busy_note as note_of_load

    note = note_of_load()
    if note:
        stage(command, f"note: {note}")


def training_extension(command: str, model: torch.nn.Module, device: torch.device, say: bool = True) -> None:
    """Load the compiled extension that builds W' in CPU training steps before the first one
    (building it on first use takes a while once per machine), with a note saying so."""
    if device.type != "cpu" or not kse_layers(model):
        return
    from .. import fused

    if say and not fused.loaded():
        stage(command, f"loading the compiled kse operators for CPU training steps ({_BUILT_ONCE})")
    if not fused.available() and say:
        stage(command, f"note: no compiled extension ({fused.build_error()}); W' is built with stock operations")


#: how long loading the compiled operators takes, in words
_BUILT_ONCE = "compiled with a C++ compiler on first use, once per machine; loaded in seconds after that"


def deploy_cpu(model: torch.nn.Module, input_size: tuple, batch_size=(1, 8), fused: bool = False,
               command: str = "deploy") -> Dict[str, str]:
    """Put the KSE layers in their fastest CPU forms, measured at batch 1 and 8 by default (a form
    per batch size where they differ), with ``fused`` the compiled kernel among them when it
    builds; ``{}`` for a dense model."""
    from ..forms import INFERENCE_FORMS
    from ..deploy import deploy_

    if not kse_layers(model):
        return {}
    if fused:
        from .. import fused as fused_mod

        if not fused_mod.loaded():
            stage(command, f"loading the compiled kse operators for the fused kernel ({_BUILT_ONCE})")
        if not fused_mod.available():
            stage(command, f"note: no fused kernel ({fused_mod.build_error()}); using the stock forms")
            fused = False
    return deploy_(model.cpu(), form="auto", input_size=input_size, batch_size=batch_size,
                   candidates=INFERENCE_FORMS + (("fused",) if fused else ()))
