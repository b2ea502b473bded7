"""Datasets by name, held in memory as uint8 tensors, batched on the training device.

Every dataset becomes train / val / test `Split`s of uint8 images (N×C×H×W)
and int64 labels. The validation split is carved from train with a fixed
seed; the test split is never used for selection. `BatchLoader` moves a
split to the device once and does normalisation and augmentation (random
crop with zero padding, horizontal flip) as batched tensor ops, so no
per-sample Python runs in the training loop.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .errors import UserError


@dataclass
class Split:
    images: torch.Tensor  # uint8, N×C×H×W
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Augment:
    crop_padding: int = 0  # random crop back to size after zero-padding each side
    flip: bool = False  # random horizontal flip


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    augment: Augment = field(default_factory=Augment)
    # per-channel statistics of the training split, in [0, 1] pixel units
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def input_size(self) -> int:
        return int(self.train.images.shape[2])


def default_root() -> Path:
    return Path.home() / ".cache" / "kdarena" / "data"


def _digits(root: Path, download: bool) -> tuple[Split, Split, int, Augment]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # pixel values are 0..16; scale to the full uint8 range like any image
    images = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    # scikit-learn ships no test split: hold out a fixed, seed-independent 20%
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(20150309))
    n_test = len(labels) // 5
    test, train = order[:n_test], order[n_test:]
    return Split(images[train], labels[train]), Split(images[test], labels[test]), 10, Augment()


_TORCHVISION_FILES = {
    "mnist": ("MNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    "fashion-mnist": ("FashionMNIST/raw", ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]),
    "cifar10": ("", ["cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/)"]),
    "cifar100": ("", ["cifar-100-python.tar.gz (or its extracted cifar-100-python/)"]),
    "svhn": ("", ["train_32x32.mat", "test_32x32.mat"]),
}

# Debian's dataset-fashion-mnist package: the four original files, offline
_DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def _torchvision(name: str, root: Path, download: bool) -> tuple[Split, Split, int, Augment]:
    from torchvision import datasets as tvd

    if name == "fashion-mnist" and _DEBIAN_FASHION.is_dir():
        raw = root / "FashionMNIST" / "raw"
        if not raw.is_dir():
            raw.mkdir(parents=True, exist_ok=True)
            for f in _DEBIAN_FASHION.glob("*.gz"):
                shutil.copy(f, raw / f.name)

    def load(train: bool):
        if name == "mnist":
            return tvd.MNIST(str(root), train=train, download=download)
        if name == "fashion-mnist":
            return tvd.FashionMNIST(str(root), train=train, download=download)
        if name == "cifar10":
            return tvd.CIFAR10(str(root), train=train, download=download)
        if name == "cifar100":
            return tvd.CIFAR100(str(root), train=train, download=download)
        return tvd.SVHN(str(root), split="train" if train else "test", download=download)

    try:
        parts = [load(True), load(False)]
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError… offline
        folder, files = _TORCHVISION_FILES[name]
        where = root / folder if folder else root
        raise UserError(
            f"dataset '{name}' is not available under {root} and could not be downloaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). Put {', '.join(files)} in {where} "
            f"and run again with dataset.root: {root}"
        ) from exc
    splits = []
    for ds in parts:
        if name == "svhn":
            images, labels = torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64))
        elif name in ("cifar10", "cifar100"):
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            labels = torch.tensor(ds.targets, dtype=torch.int64)
        else:
            images, labels = ds.data.unsqueeze(1), ds.targets.to(torch.int64)
        splits.append(Split(images.to(torch.uint8), labels))
    natural = name in ("cifar10", "cifar100", "svhn")
    # SVHN's digits must not be mirrored
    augment = Augment(crop_padding=4 if natural else 0, flip=name in ("cifar10", "cifar100"))
    num_classes = {"cifar100": 100}.get(name, 10)
    return splits[0], splits[1], num_classes, augment


def _imagefolder(root: Path, download: bool) -> tuple[Split, Split, int, Augment]:
    """Any `train/<class>/*` + `test/<class>/*` tree, or a .tar/.tar.gz of one."""
    if root.is_file() and tarfile.is_tarfile(root):
        root = _extract(root)
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise UserError(
            f"dataset 'imagefolder' needs {root}/train/<class>/* and {root}/test/<class>/*; "
            f"missing: {', '.join(missing)}. Set dataset.root to such a folder (or a .tar.gz of one)"
        )
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"dataset 'imagefolder': no class folders in {root / 'train'}")
    train = _decode_tree(root / "train", classes)
    test = _decode_tree(root / "test", classes)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise UserError(f"dataset 'imagefolder': train images are {tuple(train.images.shape[1:])} but test images are {tuple(test.images.shape[1:])}")
    return train, test, len(classes), Augment(crop_padding=max(1, train.images.shape[2] // 8), flip=True)


def _extract(archive: Path) -> Path:
    """The archive unpacked under the data root; a member that would land outside it is refused, nothing is kept."""
    digest = hashlib.sha256(f"{archive.resolve()}:{archive.stat().st_size}:{archive.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    target = default_root() / "extracted" / f"{archive.name.split('.')[0]}-{digest}"
    if not (target / ".complete").exists():
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter=_inside_only)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, tarfile.FilterError):
                raise UserError(f"dataset 'imagefolder': {archive} is refused: member {exc.tarinfo.name!r} "
                                f"{_FILTER_REASONS.get(type(exc), 'is not a plain file or folder')}; an image tree "
                                "archive holds only train/ and test/ with plain files") from None
            raise UserError(f"dataset 'imagefolder': {archive} cannot be unpacked ({type(exc).__name__}: {exc}); "
                            "pass an intact .tar/.tar.gz or the extracted folder") from None
        (tmp / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


_FILTER_REASONS = {
    tarfile.AbsolutePathError: "has an absolute path",
    tarfile.OutsideDestinationError: "would be written outside the extraction folder ('..' in its path)",
    tarfile.AbsoluteLinkError: "is a link to an absolute path",
    tarfile.LinkOutsideDestinationError: "is a link that points outside the extraction folder",
    tarfile.SpecialFileError: "is a device or other special file",
}


def _inside_only(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "data" filter, stricter: an absolute name is refused instead of being made relative."""
    if member.name.startswith(("/", "\\")) or (member.islnk() and member.linkname.startswith(("/", "\\"))):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _decode_tree(folder: Path, classes: list[str]) -> Split:
    from torchvision.io import ImageReadMode, decode_image

    cache = folder / ".kdarena-decoded.pt"
    files = [(c, p) for c, name in enumerate(classes) for p in sorted((folder / name).iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES]
    if not files:
        raise UserError(f"dataset 'imagefolder': no .jpg/.png images under {folder}")
    key = hashlib.sha256("\n".join(f"{c}:{p.name}:{p.stat().st_size}" for c, p in files).encode()).hexdigest()
    if cache.exists():
        try:  # tensors only: a cache file swapped for a crafted pickle is refused here and decoded again below
            saved = torch.load(cache, weights_only=True)
        except Exception:  # noqa: BLE001 - any unreadable cache is just stale
            saved = None
        if isinstance(saved, dict) and saved.get("key") == key and _is_split(saved.get("images"), saved.get("labels"), len(files)):
            return Split(saved["images"], saved["labels"])
    first = decode_image(str(files[0][1]), mode=ImageReadMode.RGB)
    images = torch.empty((len(files), *first.shape), dtype=torch.uint8)
    for i, (_, path) in enumerate(files):
        img = decode_image(str(path), mode=ImageReadMode.RGB)
        if img.shape != first.shape:
            raise UserError(f"dataset 'imagefolder': {path} is {tuple(img.shape)}, expected {tuple(first.shape)} like the others; resize the tree to one size")
        images[i] = img
    labels = torch.tensor([c for c, _ in files], dtype=torch.int64)
    try:
        tmp = cache.with_suffix(".partial")
        torch.save({"key": key, "images": images, "labels": labels}, tmp)
        tmp.replace(cache)
    except OSError:
        pass  # a read-only tree decodes again next time; nothing is lost
    return Split(images, labels)


def _is_split(images, labels, n: int) -> bool:
    return (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor) and images.dtype == torch.uint8
            and labels.dtype == torch.int64 and images.dim() == 4 and images.shape[0] == labels.shape[0] == n)


_LOADERS = {
    "digits": _digits,
    "mnist": lambda root, dl: _torchvision("mnist", root, dl),
    "fashion-mnist": lambda root, dl: _torchvision("fashion-mnist", root, dl),
    "cifar10": lambda root, dl: _torchvision("cifar10", root, dl),
    "cifar100": lambda root, dl: _torchvision("cifar100", root, dl),
    "svhn": lambda root, dl: _torchvision("svhn", root, dl),
    "imagefolder": _imagefolder,
}
DATASETS: tuple[str, ...] = tuple(_LOADERS)


def load_dataset(name: str, *, root: str | Path | None = None, val_fraction: float = 0.1,
                 split_seed: int = 0, download: bool = True) -> Dataset:
    """Load a dataset by name with a seeded validation split carved from train."""
    if name not in _LOADERS:
        raise UserError(f"unknown dataset '{name}'; known datasets: {', '.join(DATASETS)}")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"dataset.val_fraction must be in (0, 1), got {val_fraction}")
    if name == "imagefolder" and root is None:
        raise UserError("dataset 'imagefolder' needs dataset.root: a folder with train/ and test/ (or a .tar.gz of one)")
    root_path = Path(root).expanduser() if root is not None else default_root()
    full_train, test, num_classes, augment = _LOADERS[name](root_path, download)
    order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(split_seed))
    n_val = max(1, math.floor(len(full_train) * val_fraction))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    train = Split(full_train.images[train_idx], full_train.labels[train_idx])
    val = Split(full_train.images[val_idx], full_train.labels[val_idx])
    pixels = train.images.to(torch.float64) / 255.0
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return Dataset(name, train, val, test, num_classes, augment, tuple(mean.tolist()), tuple(std.tolist()))


class BatchLoader:
    """Batches of one split on `device`: normalised float images and labels.

    The split is copied to the device once as uint8. The order and the
    augmentation of epoch `e` depend only on (`seed`, `e`), so a run resumed
    at epoch `e` sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, split: Split, *, batch_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device | str = "cpu", shuffle: bool = False, augment: Augment | None = None,
                 seed: int = 0, channels_last: bool = False):
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment or Augment()
        self.seed = seed
        self.channels_last = channels_last
        c = self.images.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=gen, device=self.device) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size] if order is not None else slice(start, start + self.batch_size)
            x = self.images[idx].to(torch.float32).div_(255.0)
            if self.augment.crop_padding:
                x = random_crop(x, self.augment.crop_padding, gen)
            if self.augment.flip:
                x = random_flip(x, gen)
            x = (x - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Each image zero-padded by `padding` and cropped back at its own random offset.

    Two gathers (rows, then columns) instead of one 4-D fancy index: the
    same pixels, about twice as fast on CPU.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b, 1), generator=gen, device=x.device)
    ox = torch.randint(0, 2 * padding + 1, (b, 1), generator=gen, device=x.device)
    rows = (torch.arange(h, device=x.device) + oy).view(b, 1, h, 1).expand(b, c, h, w + 2 * padding)
    cols = (torch.arange(w, device=x.device) + ox).view(b, 1, 1, w).expand(b, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=gen, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)
