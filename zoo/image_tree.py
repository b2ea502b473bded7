"""An image tree (`<split>/<class>/*.jpg|png`) on disk: its files, their identity, and one image decoded at one size.

A tree is identified by what its files hold: `index_tree` hashes every
file's bytes (in class, then name order) once and keeps the result beside
the images, keyed by each file's name, size and modification time, so an
unchanged tree is indexed from that record and any file added, removed or
rewritten (even at the same size) is hashed again. The same files copied
elsewhere, or with new times, are the same data; a held-in-memory and a
streamed load of one tree are the same dataset.

`decode` gives an image at `size`×`size` the one way both loads use: an
image of that size as it is, any other resized (shorter side to `size`,
antialiased) and centre-cropped. `sampled_stats` measures a tree's
per-channel statistics on a seeded sample, the same either way.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .errors import UserError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
INDEX_FILE = ".kdarena-index.pt"


@dataclass(frozen=True)
class TreeIndex:
    """One split's files in label order, their labels, and the sha256 of their bytes and labels."""

    files: tuple[str, ...]  # where each image's bytes are (`read_bytes`): an absolute path, or a member of a .tar
    labels: torch.Tensor  # int64
    sha256: str
    stat_key: str  # names, sizes and modification times: what a cache of this split is valid for
    decoded: Path  # where the split decoded at one size is kept (`decode_all`)


# a member of an uncompressed .tar, read in place: "tar:OFFSET:SIZE:ARCHIVE\0NAME" (a file's location is an absolute
# path; no path holds a NUL, and the member's name ends the location as a file's name ends its path)
MEMBER = "tar:"


def read_bytes(location: str) -> torch.Tensor:
    """The bytes of one image, from its file or from its span of a .tar, as a uint8 tensor."""
    if not location.startswith(MEMBER):
        from torchvision.io import read_file

        return read_file(location)
    offset, size, rest = location[len(MEMBER):].split(":", 2)
    archive = rest.split("\0", 1)[0]
    with open(archive, "rb") as f:
        f.seek(int(offset))
        return torch.frombuffer(bytearray(f.read(int(size))), dtype=torch.uint8)


def index_tree(folder: Path, classes: list[str]) -> TreeIndex:
    """The images under `folder/<class>/`, with the content hash read back from its record when no file changed."""
    found = [(c, p) for c, name in enumerate(classes) for p in sorted((folder / name).iterdir())
             if p.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise UserError(f"dataset 'imagefolder': no .jpg/.png images under {folder}")
    stats = [(c, p.name, p.stat()) for c, p in found]
    stat_key = hashlib.sha256("\n".join(f"{c}:{n}:{st.st_size}:{st.st_mtime_ns}" for c, n, st in stats).encode()).hexdigest()
    files = tuple(str(p.resolve()) for _, p in found)
    labels = torch.tensor([c for c, _ in found], dtype=torch.int64)
    record = folder / INDEX_FILE
    saved = _read(record)
    if isinstance(saved, dict) and saved.get("stat_key") == stat_key and isinstance(saved.get("sha256"), str):
        return TreeIndex(files, labels, saved["sha256"], stat_key, folder / DECODED_FILE)
    sha = _content_sha256(labels.tolist(), files)
    _write(record, {"stat_key": stat_key, "sha256": sha})
    return TreeIndex(files, labels, sha, stat_key, folder / DECODED_FILE)


DECODED_FILE = ".kdarena-decoded.pt"


def _content_sha256(labels: list[int], files: tuple[str, ...]) -> str:
    """What identifies a split: each image's label and the sha256 of its bytes, in order."""
    digest = hashlib.sha256()
    for label, location in zip(labels, files):
        digest.update(f"{label}:".encode())
        digest.update(hashlib.sha256(read_bytes(location).numpy().tobytes()).digest())
    return digest.hexdigest()


def is_plain_tar(path: Path) -> bool:
    """An uncompressed .tar: its members can be read in place, at their offsets."""
    try:
        with tarfile.open(path, "r:"):
            return True
    except (tarfile.TarError, OSError):
        return False


def index_archive(archive: Path, under: Path) -> tuple[list[str], TreeIndex, TreeIndex]:
    """An uncompressed .tar of a tree read in place, nothing unpacked: its classes, then its train and test splits,
    each image located by its span in the archive. A member that would land outside the tree if unpacked is refused
    as `extract` refuses it. The index is kept under `under`, keyed by the archive's path, size and modification
    time."""
    stat = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = under / "archives" / f"{archive.name.split('.')[0]}-{key}"
    images: dict[str, dict[str, list[tuple[str, str]]]] = {"train": {}, "test": {}}
    with tarfile.open(archive, "r:") as tar:
        for member in tar:
            try:
                _inside_only(member, str(folder))
            except tarfile.FilterError as exc:
                raise _refused(archive, exc) from None
            parts = [p for p in member.name.split("/") if p not in ("", ".")]
            if member.isfile() and len(parts) == 3 and parts[0] in images and Path(parts[2]).suffix.lower() in IMAGE_SUFFIXES:
                location = f"{MEMBER}{member.offset_data}:{member.size}:{archive.resolve()}\0{parts[2]}"
                images[parts[0]].setdefault(parts[1], []).append((parts[2], location))
    classes = sorted(images["train"])
    if not classes or not images["test"]:
        raise UserError(f"dataset 'imagefolder': {archive} holds no train/<class>/* and test/<class>/* images; pass "
                        "a .tar of a folder with train/ and test/")
    splits = []
    for split in ("train", "test"):
        found = [(c, location) for c, name in enumerate(classes) for _, location in sorted(images[split].get(name, []))]
        files = tuple(location for _, location in found)
        labels = torch.tensor([c for c, _ in found], dtype=torch.int64)
        record = folder / f"{split}-index.pt"
        saved = _read(record)
        if isinstance(saved, dict) and saved.get("files") == list(files) and isinstance(saved.get("sha256"), str):
            sha = saved["sha256"]
        else:
            sha = _content_sha256(labels.tolist(), files)
            folder.mkdir(parents=True, exist_ok=True)
            _write(record, {"files": list(files), "sha256": sha})
        splits.append(TreeIndex(files, labels, sha, f"{key}:{split}", folder / f"{split}-decoded.pt"))
    return classes, splits[0], splits[1]


def decode(location: str, size: int | None = None) -> torch.Tensor:
    """One image as uint8 RGB (3×H×W), fitted to `size`×`size` when a size is given."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        image = decode_image(read_bytes(location), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        where = location.replace("\0", " member ")
        raise UserError(f"dataset 'imagefolder': {where} cannot be decoded ({str(exc).splitlines()[0][:200]}); "
                        "remove or replace it") from None
    return image if size is None else fit(image, size)


def fit(image: torch.Tensor, size: int) -> torch.Tensor:
    """`image` (C×H×W) at `size`×`size`: as it is at that size, else shorter side resized to `size`, centre-cropped."""
    if image.shape[-2:] == (size, size):
        return image
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(TF.resize(image, [size], antialias=True), [size, size])


def decode_all(index: TreeIndex, size: int) -> torch.Tensor:
    """Every image of a split decoded at `size`, cached (`index.decoded`) by the split's file stats and the size."""
    cache = index.decoded
    key = f"{index.stat_key}:{size}"
    saved = _read(cache)
    if isinstance(saved, dict) and saved.get("key") == key:
        images = saved.get("images")
        if (isinstance(images, torch.Tensor) and images.dtype == torch.uint8
                and tuple(images.shape) == (len(index.files), 3, size, size)):
            return images
    images = torch.empty((len(index.files), 3, size, size), dtype=torch.uint8)
    for i, path in enumerate(index.files):
        images[i] = decode(path, size)
    _write(cache, {"key": key, "images": images})
    return images


def _read(path: Path):
    if not path.exists():
        return None
    try:  # tensors only: a record swapped for a crafted pickle is refused here and rebuilt
        return torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable record is just stale
        return None


def _write(path: Path, content: dict) -> None:
    try:
        tmp = path.with_name(path.name + ".partial")
        torch.save(content, tmp)
        tmp.replace(path)
    except OSError:
        pass  # a read-only tree is indexed or decoded again next time; nothing is lost


@dataclass(frozen=True)
class TreeOptions:
    """How an image tree is read: held in memory or streamed, and at what size (`load_dataset`)."""

    in_memory: bool | Literal["auto"] = "auto"
    memory_budget_mb: float | None = None  # None: a quarter of this machine's memory
    image_size: int | None = None  # None: the first training image's shorter side
    workers: int | None = None  # decoding processes of a streamed split; None: one per core, at most 8


def memory_budget_bytes(budget_mb: float | None) -> int:
    """The most a decoded training split may take in memory before `in_memory: auto` streams it."""
    if budget_mb is not None:
        return int(budget_mb * 2**20)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def extract(archive: Path, under: Path) -> Path:
    """The archive unpacked in a folder of `under`; a member that would land outside it is refused, nothing is kept."""
    digest = hashlib.sha256(f"{archive.resolve()}:{archive.stat().st_size}:{archive.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    target = under / "extracted" / f"{archive.name.split('.')[0]}-{digest}"
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
                raise _refused(archive, exc) from None
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


def _refused(archive: Path, exc: tarfile.FilterError) -> UserError:
    return UserError(f"dataset 'imagefolder': {archive} is refused: member {exc.tarinfo.name!r} "
                     f"{_FILTER_REASONS.get(type(exc), 'is not a plain file or folder')}; an image tree archive holds "
                     "only train/ and test/ with plain files")


def _inside_only(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "data" filter, stricter: an absolute name is refused instead of being made relative."""
    if member.name.startswith(("/", "\\")) or (member.islnk() and member.linkname.startswith(("/", "\\"))):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


# images an image tree's statistics are measured on: enough for 3-4 significant digits, and one decode pass of a
# streamed tree's sample costs seconds, not the epoch a full pass of ImageNet would
STATS_SAMPLE = 10_000


def sampled_stats(split, seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation over a seeded sample of `STATS_SAMPLE` images (all, if fewer) of a
    split (`data.Split` or `streaming.FileSplit`), the same numbers whether it is held in memory or streamed."""
    from .streaming import loader_for

    pick = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:STATS_SAMPLE].sort().values
    channels = split.image_shape[0]
    zero, one = (0.0,) * channels, (1.0,) * channels
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for images, _ in loader_for(split.subset(pick), batch_size=256, mean=zero, std=one):
        pixels = images.to(torch.float64)
        total += pixels.sum(dim=(0, 2, 3))
        squares += pixels.square().sum(dim=(0, 2, 3))
    count = len(pick) * split.image_shape[1] * split.image_shape[2]
    mean = total / count
    var = ((squares - count * mean.square()) / max(1, count - 1)).clamp_min(0)
    return tuple(mean.tolist()), tuple(var.sqrt().clamp_min(1e-3).tolist())
