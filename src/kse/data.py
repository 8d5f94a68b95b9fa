"""Datasets: the embedded Fashion-MNIST default, MNIST, CIFAR-10/100, SVHN, ImageNet, any
image folder, and torchvision's FakeData for tests; each with its usual augmentation
(pad-4 random crop + horizontal flip for the small-image sets, as in the KSE paper's CIFAR
runs; random-resized-crop for ImageNet-style folders).

Fashion-MNIST is looked up, in order, at ``--data-dir``, ``$KSE_DATA``, and Debian's
``dataset-fashion-mnist`` files in ``/usr/share/datasets/fashion-mnist``; torchvision's
downloader is tried last (only where a network exists).

Example::

    >>> from kse.data import get_dataset, dataset_info
    >>> dataset_info("fashion-mnist").num_classes
    10
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class DatasetInfo:
    """What a model trained on a dataset expects at its input."""

    name: str
    num_classes: int
    in_channels: int
    input_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    train_crop: str = "pad4"  # "pad4" (small images) or "rrc" (ImageNet-style)

    def preprocess(self) -> dict:
        """The input preprocessing, as stored in a KSE file."""
        return {"dataset": self.name, "input_size": [self.in_channels, self.input_size, self.input_size],
                "mean": list(self.mean), "std": list(self.std), "num_classes": self.num_classes}


_INFO = {
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,)),
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,)),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "imagenet": DatasetInfo("imagenet", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "rrc"),
    "imagefolder": DatasetInfo("imagefolder", 0, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "rrc"),
    "fake": DatasetInfo("fake", 10, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


class DatasetError(ValueError):
    """A dataset that cannot be found or read; the message says where it was looked for."""


def list_datasets() -> List[str]:
    return sorted(_INFO)


def dataset_info(name: str) -> DatasetInfo:
    if name not in _INFO:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")
    return _INFO[name]


class TensorImageDataset(Dataset):
    """Images held in memory as ``uint8 Tensor[M, C, H, W]`` with labels; pad-crop + flip on the fly."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, train: bool) -> None:
        self.images, self.labels, self.train = images, labels, train
        self.mean = torch.tensor(info.mean).view(-1, 1, 1)
        self.std = torch.tensor(info.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i].float().div_(255)
        if self.train:
            h, w = x.shape[-2:]
            x = torch.nn.functional.pad(x, (4, 4, 4, 4))
            dy, dx = torch.randint(0, 9, (2,)).tolist()
            x = x[:, dy:dy + h, dx:dx + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std, int(self.labels[i])


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of a dataset, in order: across the ranks every
    sample is seen exactly once.

    NOTE: unlike ``DistributedSampler`` it does not pad the shards to equal length with
    repeated samples, so summed evaluation counts equal the dataset size.
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) = [0, {world_size}), got {rank}")
        self.length, self.rank, self.world_size = len(dataset), rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError) as exc:  # a cut-off or corrupt gzip stream, an unreadable file
        raise DatasetError(f"{path} cannot be read ({type(exc).__name__}: {exc}); delete it and fetch it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not an IDX file of unsigned bytes (magic 0x0000080N)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{path} is truncated: its header names {ndim} dimensions but the file has "
                           f"{len(data)} bytes")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DatasetError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


def _find_idx(dirs: List[Path], stem: str) -> Optional[Path]:
    for d in dirs:
        for sub in ("", "raw", "FashionMNIST/raw", "MNIST/raw"):
            for suffix in (".gz", ""):
                p = d / sub / (stem + suffix)
                if p.is_file():
                    return p
    return None


def _idx_dataset(name: str, data_dir: Optional[str], train: bool, augment: bool) -> Dataset:
    info = _INFO[name]
    dirs = [Path(p) for p in (data_dir, os.environ.get("KSE_DATA")) if p]
    dirs += [Path(p) / name for p in (data_dir, os.environ.get("KSE_DATA")) if p]
    if name == "fashion-mnist":
        dirs.append(Path(DEBIAN_FMNIST))
    split = "train" if train else "t10k"
    img = _find_idx(dirs, f"{split}-images-idx3-ubyte")
    lab = _find_idx(dirs, f"{split}-labels-idx1-ubyte")
    if img is None or lab is None:
        root = str(dirs[0]) if dirs else os.path.expanduser("~/.cache/kse")
        try:  # where a network exists, torchvision can fetch it
            import torchvision

            cls = torchvision.datasets.FashionMNIST if name == "fashion-mnist" else torchvision.datasets.MNIST
            ds = cls(root, train=train, download=True)
            images, labels = ds.data.unsqueeze(1), ds.targets
            return TensorImageDataset(images, labels, info, augment)
        except Exception as exc:  # noqa: BLE001 - reported as one clear line below
            looked = ", ".join(str(d) for d in dirs) or "(no directory given)"
            hint = ("apt-get install dataset-fashion-mnist, or " if name == "fashion-mnist" else "")
            raise DatasetError(
                f"{name} {split} files not found (looked in: {looked}; download failed: "
                f"{type(exc).__name__}); {hint}put {split}-images-idx3-ubyte.gz and "
                f"{split}-labels-idx1-ubyte.gz in --data-dir or $KSE_DATA"
            ) from None
    images = torch.from_numpy(_read_idx(img).copy()).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(lab).astype(np.int64))
    if len(images) != len(labels):
        raise DatasetError(f"{img} has {len(images)} images but {lab} has {len(labels)} labels")
    return TensorImageDataset(images, labels, info, augment)


def _transforms(info: DatasetInfo, train: bool):
    import torchvision.transforms as T

    norm = T.Normalize(info.mean, info.std)
    if info.train_crop == "rrc":
        if train:
            return T.Compose([T.RandomResizedCrop(info.input_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        return T.Compose([T.Resize(int(info.input_size * 256 / 224)), T.CenterCrop(info.input_size), T.ToTensor(), norm])
    if train:
        flip = [] if info.name == "svhn" else [T.RandomHorizontalFlip()]
        return T.Compose([T.RandomCrop(info.input_size, padding=4), *flip, T.ToTensor(), norm])
    return T.Compose([T.ToTensor(), norm])


def get_dataset(name: str, data_dir: Optional[str] = None, train: bool = True,
                fake_size: int = 256, input_size: Optional[int] = None,
                augment: Optional[bool] = None) -> Tuple[Dataset, DatasetInfo]:
    """Return ``(dataset, info)`` for ``name``; a missing dataset raises :class:`DatasetError`.

    ``train`` picks the split; ``augment`` (default: the same as ``train``) its training
    augmentation, off for the training images that BatchNorm recalibration reads."""
    info = dataset_info(name)
    augment = train if augment is None else augment
    if input_size is not None and (not isinstance(input_size, int) or isinstance(input_size, bool)
                                   or not 1 <= input_size <= 4096):
        raise DatasetError(f"input_size must be an integer in [1, 4096] (the image side), got {input_size!r}")
    if data_dir and name != "fake" and not Path(data_dir).is_dir():  # not silently another copy found elsewhere
        raise DatasetError(f"--data-dir {data_dir} is not a folder; give the folder holding {name}, or leave "
                           "--data-dir out to use the default locations")
    if name in ("fashion-mnist", "mnist"):
        return _idx_dataset(name, data_dir, train, augment), info
    import torchvision.datasets as D

    root = data_dir or os.environ.get("KSE_DATA") or os.path.expanduser("~/.cache/kse")
    if name == "fake":
        size = input_size if input_size is not None else info.input_size
        info = DatasetInfo("fake", info.num_classes, 3, size, info.mean, info.std)
        ds = D.FakeData(fake_size if train else max(fake_size // 4, 8), (3, size, size), info.num_classes,
                        transform=_transforms(info, augment), random_offset=0 if train else 10_000)
        return ds, info
    try:
        if name in ("cifar10", "cifar100"):
            cls = D.CIFAR10 if name == "cifar10" else D.CIFAR100
            ds = cls(root, train=train, transform=_transforms(info, augment), download=False)
        elif name == "svhn":
            ds = D.SVHN(root, split="train" if train else "test", transform=_transforms(info, augment), download=False)
        else:
            sub = Path(root) / ("train" if train else "val")
            ds = D.ImageFolder(str(sub), transform=_transforms(info, augment))
            if name == "imagefolder":
                info = DatasetInfo("imagefolder", len(ds.classes), 3, info.input_size, info.mean, info.std, "rrc")
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        raise DatasetError(
            f"{name} not found under {root} ({exc}); download it there or pass --data-dir"
        ) from None
    return ds, info
