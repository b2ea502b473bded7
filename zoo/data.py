"""Datasets by name, held in memory as uint8 tensors or streamed from disk, batched on the training device.

Every dataset becomes train / val / test splits of uint8 images (N×C×H×W)
and int64 labels. The validation split is carved from train with a fixed
seed; the test split is never used for selection. `BatchLoader` moves a
split to the device once and does normalisation and augmentation (the
policies of `augment.py`) as batched tensor ops, so no per-sample Python
runs in the training loop. An image tree (`imagefolder`) whose decoded
training split would pass a memory budget is streamed instead
(`streaming.py`: the same batches, decoded from the files by worker
processes); `TreeOptions` say which, and at what size.

A dataset is identified by its content, not its name: `fingerprint` is the
sha256 of its images, labels and class names (train and test; for an image
tree, of its files' bytes: `image_tree.py`), so two image folders with the
same layout are two datasets, and a file added, removed or replaced gives a
new one. `label` is the name people read (the folder's name for
`imagefolder`, the dataset's name otherwise, or `dataset.label`).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .augment import CropFlip, NoAugment, Policy, default_policy
from .errors import UserError
from .image_tree import TreeOptions, memory_budget_bytes, sampled_stats

if TYPE_CHECKING:
    from .streaming import FileSplit


@dataclass
class Split:
    images: torch.Tensor  # uint8, N×C×H×W
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, idx: torch.Tensor) -> Split:
        return Split(self.images[idx], self.labels[idx])


@dataclass
class Dataset:
    name: str
    train: Split | FileSplit  # a FileSplit: streamed from disk (`streaming.py`)
    val: Split | FileSplit
    test: Split | FileSplit
    num_classes: int
    augment: Policy = field(default_factory=NoAugment)  # the dataset's default policy
    # per-channel statistics of the training split, in [0, 1] pixel units
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    fingerprint: str = ""  # sha256 of the content (train and test images, labels, class names)
    label: str = ""  # the name shown for it
    classes: tuple[str, ...] = ()  # each label's name, in label order (what a deployed student's card lists)

    @property
    def in_channels(self) -> int:
        return int(self.train.image_shape[0])

    @property
    def input_size(self) -> int:
        return int(self.train.image_shape[1])

    @property
    def streamed(self) -> bool:
        return not isinstance(self.train, Split)

    @property
    def reading(self) -> dict[str, int | bool]:
        """How an image tree's files become the images trained on (nothing for other datasets): what a trained
        teacher or its outputs depend on beside the files (a per-sample crop is drawn from the file streamed, from
        the image at `image_size` held in memory)."""
        return {"image_size": self.input_size, "streamed": self.streamed} if self.name == "imagefolder" else {}


def default_root() -> Path:
    return Path.home() / ".cache" / "kdarena" / "data"


@dataclass
class _Loaded:
    """What a loader gives: the full training split, the test split, and what names and identifies them."""

    train: Split
    test: Split
    classes: list[str]
    augment: Policy
    label: str
    fingerprint: str | None = None  # None: computed from the tensors
    stats_from_sample: bool = False  # mean and std over a seeded sample of the training split (`sampled_stats`)


def content_fingerprint(train: Split, test: Split, classes: list[str]) -> str:
    """sha256 of a dataset's content: class names, then each split's shape, images and labels."""
    digest = hashlib.sha256("\n".join(classes).encode())
    for split in (train, test):
        digest.update(repr(tuple(split.images.shape)).encode())
        for t in (split.images, split.labels):
            if t.numel():
                digest.update(memoryview(t.contiguous().numpy()).cast("B"))
    return digest.hexdigest()


def _digits(root: Path, download: bool) -> _Loaded:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # pixel values are 0..16; scale to the full uint8 range like any image
    images = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    # scikit-learn ships no test split: hold out a fixed, seed-independent 20%
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(20150309))
    n_test = len(labels) // 5
    test, train = order[:n_test], order[n_test:]
    return _Loaded(Split(images[train], labels[train]), Split(images[test], labels[test]), _numbered(10), NoAugment(),
                   "digits")


def _numbered(n: int) -> list[str]:
    return [str(i) for i in range(n)]


_TORCHVISION_FILES = {
    "mnist": ("MNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    "fashion-mnist": ("FashionMNIST/raw", ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]),
    "cifar10": ("", ["cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/)"]),
    "cifar100": ("", ["cifar-100-python.tar.gz (or its extracted cifar-100-python/)"]),
    "svhn": ("", ["train_32x32.mat", "test_32x32.mat"]),
}

# Debian's dataset-fashion-mnist package: the four original files, offline
_DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def _unpack_debian_fashion(raw: Path) -> None:
    """Debian's four files, decompressed where torchvision looks for them.

    Debian rewrote the .gz headers, so torchvision's md5 check refuses the
    compressed files and tries to download; the decompressed bytes are the
    originals, and torchvision takes decompressed files as they are.
    """
    import gzip

    raw.mkdir(parents=True, exist_ok=True)
    for source in _DEBIAN_FASHION.glob("*.gz"):
        target = raw / source.name.removesuffix(".gz")
        if target.exists():
            continue
        tmp = target.with_name(target.name + ".partial")
        with gzip.open(source, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        tmp.replace(target)


def _torchvision(name: str, root: Path, download: bool) -> _Loaded:
    from torchvision import datasets as tvd

    if name == "fashion-mnist" and _DEBIAN_FASHION.is_dir():
        _unpack_debian_fashion(root / "FashionMNIST" / "raw")

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
    augment = CropFlip(padding=4, flip=name != "svhn") if natural else NoAugment()
    classes = list(getattr(parts[0], "classes", None) or _numbered({"cifar100": 100}.get(name, 10)))
    return _Loaded(splits[0], splits[1], classes, augment, name)


def _imagefolder(root: Path, options: TreeOptions) -> _Loaded:
    """Any `train/<class>/*` + `test/<class>/*` tree, or a .tar/.tar.gz of one: held in memory or streamed."""
    from .image_tree import decode, decode_all, extract, index_archive, index_tree, is_plain_tar
    from .streaming import FileSplit

    label = root.resolve().name.split(".")[0] if root.is_file() else root.resolve().name
    if root.is_file() and is_plain_tar(root):  # read in place, nothing unpacked
        classes, train, test = index_archive(root, default_root())
    else:
        if root.is_file() and tarfile.is_tarfile(root):  # compressed: no member can be read at an offset
            root = extract(root, default_root())
        missing = [s for s in ("train", "test") if not (root / s).is_dir()]
        if missing:
            raise UserError(
                f"dataset 'imagefolder' needs {root}/train/<class>/* and {root}/test/<class>/*; "
                f"missing: {', '.join(missing)}. Set dataset.root to such a folder (or a .tar/.tar.gz of one)"
            )
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        if not classes:
            raise UserError(f"dataset 'imagefolder': no class folders in {root / 'train'}")
        train, test = index_tree(root / "train", classes), index_tree(root / "test", classes)
    size = options.image_size or min(decode(train.files[0]).shape[-2:])
    fingerprint = hashlib.sha256("\n".join(["imagefolder", *classes, train.sha256, test.sha256]).encode()).hexdigest()
    decoded_bytes = len(train.files) * 3 * size * size
    stream = (not options.in_memory if isinstance(options.in_memory, bool)
              else decoded_bytes > memory_budget_bytes(options.memory_budget_mb))
    if stream:
        workers = options.workers if options.workers is not None else min(8, os.cpu_count() or 1)
        splits = [FileSplit(index.files, index.labels, size, workers) for index in (train, test)]
    else:
        splits = [Split(decode_all(index, size), index.labels) for index in (train, test)]
    # every image's identity is in the fingerprint; the size it is read at, in the name of the data
    return _Loaded(splits[0], splits[1], classes, default_policy(size), label, fingerprint, stats_from_sample=True)


_LOADERS = {
    "digits": _digits,
    "mnist": lambda root, dl: _torchvision("mnist", root, dl),
    "fashion-mnist": lambda root, dl: _torchvision("fashion-mnist", root, dl),
    "cifar10": lambda root, dl: _torchvision("cifar10", root, dl),
    "cifar100": lambda root, dl: _torchvision("cifar100", root, dl),
    "svhn": lambda root, dl: _torchvision("svhn", root, dl),
}
DATASETS: tuple[str, ...] = (*_LOADERS, "imagefolder")


def load_dataset(name: str, *, root: str | Path | None = None, val_fraction: float = 0.1,
                 split_seed: int = 0, download: bool = True, label: str | None = None,
                 tree: TreeOptions | None = None) -> Dataset:
    """Load a dataset by name with a seeded validation split carved from train, identified by its content.

    `tree`: how an `imagefolder` is read (held in memory or streamed, the image size); other datasets are held in
    memory."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; known datasets: {', '.join(DATASETS)}")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"dataset.val_fraction must be in (0, 1), got {val_fraction}")
    tree = tree or TreeOptions()
    if name == "imagefolder" and root is None:
        raise UserError("dataset 'imagefolder' needs dataset.root: a folder with train/ and test/ (or a .tar.gz of one)")
    if name != "imagefolder" and (tree.in_memory is False or tree.image_size is not None):
        raise UserError(f"dataset '{name}' is always held in memory at its own size: dataset.in_memory: false and "
                        "dataset.image_size apply to an imagefolder; remove them")
    root_path = Path(root).expanduser() if root is not None else default_root()
    loaded = _imagefolder(root_path, tree) if name == "imagefolder" else _LOADERS[name](root_path, download)
    full_train, test = loaded.train, loaded.test
    fingerprint = loaded.fingerprint or content_fingerprint(full_train, test, loaded.classes)
    order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(split_seed))
    n_val = max(1, math.floor(len(full_train) * val_fraction))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    train, val = full_train.subset(train_idx), full_train.subset(val_idx)
    mean, std = sampled_stats(train, split_seed) if loaded.stats_from_sample else channel_stats(train.images)
    return Dataset(name, train, val, test, len(loaded.classes), loaded.augment, mean, std, fingerprint,
                   label or loaded.label, tuple(loaded.classes))


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, in [0, 1] pixel units."""
    pixels = images.to(torch.float64) / 255.0
    return tuple(pixels.mean(dim=(0, 2, 3)).tolist()), tuple(pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())


@dataclass
class Batch:
    images: torch.Tensor  # normalised, the recipe's augmentation applied
    labels: torch.Tensor
    indices: torch.Tensor  # each image's position in its split (CRD's memory bank is keyed by it)
    strong: torch.Tensor | None = None  # the same images under the strong view's policy, when one is asked for
    global_size: int | None = None  # the whole batch's size, where this holds only the rows `keep_rows` selected


class BatchLoader:
    """Batches of one split on `device`: normalised float images and labels.

    The split is copied to the device once as uint8. The order and the
    augmentation of epoch `e` depend only on (`seed`, `e`), so a run resumed
    at epoch `e` sees exactly the batches an uninterrupted run would. A
    second, `strong` view draws from its own generator, so asking for it
    leaves the first view's batches unchanged.
    """

    def __init__(self, split: Split, *, batch_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device | str = "cpu", shuffle: bool = False, augment: Policy | None = None,
                 seed: int = 0, channels_last: bool = False, strong: Policy | None = None):
        self.device = torch.device(device)
        self._hold(split)
        self.labels = split.labels.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment or NoAugment()
        self.strong = strong
        self.seed = seed
        self.channels_last = channels_last
        c = split.image_shape[0]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.epoch = 0

    def _hold(self, split) -> None:
        """Keep what batches are made from: the split's images, on the device once."""
        self.images = split.images.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.batches():
            yield batch.images, batch.labels

    def batches(self) -> Iterator[Batch]:
        n = len(self.labels)
        gen = torch.Generator(device=self.device).manual_seed(self.epoch_seed)
        strong_gen = torch.Generator(device=self.device).manual_seed(self.epoch_seed + 2**40)
        if self.shuffle:
            order = torch.randperm(n, generator=gen, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        chunks = [order[start:start + self.batch_size] for start in range(0, n, self.batch_size)]
        kept = chunks if self.keep is None else [self.keep(chunk) for chunk in chunks]
        for chunk, (idx, raw, plain) in zip(chunks, self._fetch(kept, augment=True)):
            strong = self._finish(self.strong.apply(plain, strong_gen)) if self.strong is not None else None
            main = raw if self.augments_in_fetch else self.augment.apply(raw, gen)
            yield Batch(self._finish(main), self.labels[idx], idx, strong,
                        None if self.keep is None else len(chunk))

    keep = None  # Callable[[Tensor], Tensor]: the rows of each batch's indices to read, where only they are wanted

    def keep_rows(self, select) -> bool:
        """Read only `select(indices)` of each batch (a data-parallel replica's rows), where that leaves every
        random draw as it is: with no augmentation, or one drawn per image from its own seed as it is read; True if
        so. Otherwise every row is read, and the caller selects."""
        if self.strong is None and (self.augments_in_fetch or isinstance(self.augment, NoAugment)):
            self.keep = select
        return self.keep is not None

    @property
    def epoch_seed(self) -> int:
        """What every random draw of the current epoch derives from."""
        return self.seed * 100_003 + self.epoch

    # whether `_fetch` has applied the policy already (a streamed split applies a per-sample policy as it decodes)
    augments_in_fetch = False

    def windows(self) -> Iterator[Batch]:
        """The split in order, unaugmented, in batches of exactly `batch_size` (the last overlapping the one before).

        Every image is seen in a batch of the training size: what a per-image
        cache of a network's outputs is computed over, since a kernel's result
        may depend on the batch's size.
        """
        n = len(self.labels)
        size = min(self.batch_size, n)
        chunks = [torch.arange(min(start, n - size), min(start, n - size) + size, device=self.device)
                  for start in range(0, n, size)]
        for idx, raw, _ in self._fetch(chunks, augment=False):
            yield Batch(self._finish(raw), self.labels[idx], idx)

    def _fetch(self, chunks: list[torch.Tensor], augment: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each chunk of indices with its images as floats in [0, 1], twice: as the policy leaves them when
        `augments_in_fetch` (and `augment`), and as they are."""
        for idx in chunks:
            raw = self.images[idx].to(torch.float32).div_(255.0)
            yield idx, raw, raw

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
