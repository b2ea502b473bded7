"""Datasets by name, held in memory as uint8 tensors, batched on the training device.

Every dataset becomes train / val / test `Split`s of uint8 images (N×C×H×W)
and int64 labels. The validation split is carved from train with a fixed
seed; the test split is never used for selection. `BatchLoader` moves a
split to the device once and does normalisation and augmentation (the
policies of `augment.py`) as batched tensor ops, so no per-sample Python
runs in the training loop.

A dataset is identified by its content, not its name: `fingerprint` is the
sha256 of its images, labels and class names (train and test), so two image
folders with the same layout are two datasets, and a file added, removed or
replaced gives a new one. `label` is the name people read (the folder's name
for `imagefolder`, the dataset's name otherwise, or `dataset.label`).
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

from .augment import CropFlip, NoAugment, Policy
from .errors import UserError


@dataclass
class Split:
    images: torch.Tensor  # uint8, N×C×H×W
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
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
        return int(self.train.images.shape[1])

    @property
    def input_size(self) -> int:
        return int(self.train.images.shape[2])


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


def _imagefolder(root: Path, download: bool) -> _Loaded:
    """Any `train/<class>/*` + `test/<class>/*` tree, or a .tar/.tar.gz of one."""
    label = root.resolve().name.split(".")[0] if root.is_file() else root.resolve().name
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
    train, train_sha = _decode_tree(root / "train", classes)
    test, test_sha = _decode_tree(root / "test", classes)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise UserError(f"dataset 'imagefolder': train images are {tuple(train.images.shape[1:])} but test images are {tuple(test.images.shape[1:])}")
    fingerprint = hashlib.sha256("\n".join(["imagefolder", *classes, train_sha, test_sha]).encode()).hexdigest()
    return _Loaded(train, test, classes, CropFlip(padding=max(1, train.images.shape[2] // 8), flip=True), label,
                   fingerprint)


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


def _decode_tree(folder: Path, classes: list[str]) -> tuple[Split, str]:
    """The images under `folder/<class>/`, decoded, and the sha256 of what they decode to.

    Decoding is cached beside the images, keyed by every file's name, size
    and modification time, so an unchanged tree is read back in one load and
    any file added, removed or rewritten (even at the same size) decodes
    again. The content hash is of the decoded pixels and labels: the same
    images elsewhere, or copied with new times, are the same data.
    """
    from torchvision.io import ImageReadMode, decode_image

    cache = folder / ".kdarena-decoded.pt"
    files = [(c, p) for c, name in enumerate(classes) for p in sorted((folder / name).iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES]
    if not files:
        raise UserError(f"dataset 'imagefolder': no .jpg/.png images under {folder}")
    stats = [(c, p.name, p.stat()) for c, p in files]
    key = hashlib.sha256("\n".join(f"{c}:{n}:{st.st_size}:{st.st_mtime_ns}" for c, n, st in stats).encode()).hexdigest()
    if cache.exists():
        try:  # tensors only: a cache file swapped for a crafted pickle is refused here and decoded again below
            saved = torch.load(cache, weights_only=True)
        except Exception:  # noqa: BLE001 - any unreadable cache is just stale
            saved = None
        if (isinstance(saved, dict) and saved.get("key") == key and isinstance(saved.get("sha256"), str)
                and _is_split(saved.get("images"), saved.get("labels"), len(files))):
            return Split(saved["images"], saved["labels"]), saved["sha256"]
    first = decode_image(str(files[0][1]), mode=ImageReadMode.RGB)
    images = torch.empty((len(files), *first.shape), dtype=torch.uint8)
    for i, (_, path) in enumerate(files):
        img = decode_image(str(path), mode=ImageReadMode.RGB)
        if img.shape != first.shape:
            raise UserError(f"dataset 'imagefolder': {path} is {tuple(img.shape)}, expected {tuple(first.shape)} like the others; resize the tree to one size")
        images[i] = img
    labels = torch.tensor([c for c, _ in files], dtype=torch.int64)
    split = Split(images, labels)
    sha = content_fingerprint(split, Split(images[:0], labels[:0]), [])
    try:
        tmp = cache.with_suffix(".partial")
        torch.save({"key": key, "images": images, "labels": labels, "sha256": sha}, tmp)
        tmp.replace(cache)
    except OSError:
        pass  # a read-only tree decodes again next time; nothing is lost
    return split, sha


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
                 split_seed: int = 0, download: bool = True, label: str | None = None) -> Dataset:
    """Load a dataset by name with a seeded validation split carved from train, identified by its content."""
    if name not in _LOADERS:
        raise UserError(f"unknown dataset '{name}'; known datasets: {', '.join(DATASETS)}")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"dataset.val_fraction must be in (0, 1), got {val_fraction}")
    if name == "imagefolder" and root is None:
        raise UserError("dataset 'imagefolder' needs dataset.root: a folder with train/ and test/ (or a .tar.gz of one)")
    root_path = Path(root).expanduser() if root is not None else default_root()
    loaded = _LOADERS[name](root_path, download)
    full_train, test = loaded.train, loaded.test
    fingerprint = loaded.fingerprint or content_fingerprint(full_train, test, loaded.classes)
    order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(split_seed))
    n_val = max(1, math.floor(len(full_train) * val_fraction))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    train = Split(full_train.images[train_idx], full_train.labels[train_idx])
    val = Split(full_train.images[val_idx], full_train.labels[val_idx])
    pixels = train.images.to(torch.float64) / 255.0
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return Dataset(name, train, val, test, len(loaded.classes), loaded.augment, tuple(mean.tolist()),
                   tuple(std.tolist()), fingerprint, label or loaded.label, tuple(loaded.classes))


@dataclass
class Batch:
    images: torch.Tensor  # normalised, the recipe's augmentation applied
    labels: torch.Tensor
    indices: torch.Tensor  # each image's position in its split (CRD's memory bank is keyed by it)
    strong: torch.Tensor | None = None  # the same images under the strong view's policy, when one is asked for


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
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment or NoAugment()
        self.strong = strong
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
        for batch in self.batches():
            yield batch.images, batch.labels

    def batches(self) -> Iterator[Batch]:
        n = len(self.labels)
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + self.epoch)
        strong_gen = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + self.epoch + 2**40)
        if self.shuffle:
            order = torch.randperm(n, generator=gen, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            raw = self._raw(idx)
            strong = self._finish(self.strong.apply(raw, strong_gen)) if self.strong is not None else None
            yield Batch(self._finish(self.augment.apply(raw, gen)), self.labels[idx], idx, strong)

    def windows(self) -> Iterator[Batch]:
        """The split in order, unaugmented, in batches of exactly `batch_size` (the last overlapping the one before).

        Every image is seen in a batch of the training size: what a per-image
        cache of a network's outputs is computed over, since a kernel's result
        may depend on the batch's size.
        """
        n = len(self.labels)
        size = min(self.batch_size, n)
        for start in range(0, n, size):
            idx = torch.arange(min(start, n - size), min(start, n - size) + size, device=self.device)
            yield Batch(self._finish(self._raw(idx)), self.labels[idx], idx)

    def _raw(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx].to(torch.float32).div_(255.0)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
