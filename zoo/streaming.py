"""Image trees too large to hold in memory, decoded batch by batch from disk in DataLoader worker processes.

A `FileSplit` is a split's file paths and labels; `StreamLoader` gives its
batches exactly as `BatchLoader` gives an in-memory split's: the epoch's
order comes from the same generator, and a batched policy (`crop_flip`, …)
runs on the training device with that generator, so a tree of one image
size streams to the very batches its in-memory load gives. A per-sample
policy (`random_resized_crop`) runs in the workers on each decoded file at
its own size, drawing from a generator seeded by (seed, epoch, image), so
the batches of epoch `e` depend only on (seed, e) whatever the number of
workers, and a resumed run sees the same images. Workers only decode and
crop; normalisation stays on the device. On CUDA, a tree of large JPEGs
is decoded on the GPU (`torchvision.io.decode_jpeg`), the workers only
reading the files: the same crops, drawn from the same seeds. Small JPEGs
decode faster in CPU workers than on the GPU.

Every worker reads the files itself: on a cluster, the tree must be at the
same path on every node.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from .augment import LARGE_IMAGE_SIZE, Policy
from .data import BatchLoader
from .image_tree import decode, fit, read_bytes


@dataclass(frozen=True)
class FileSplit:
    """A split read from disk: its files, their labels, the side its images are fitted to, and the decoders."""

    files: tuple[str, ...]
    labels: torch.Tensor  # int64
    image_size: int
    workers: int  # DataLoader worker processes decoding its files (0: in the training process)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def subset(self, idx: torch.Tensor) -> FileSplit:
        return replace(self, files=tuple(self.files[i] for i in idx.tolist()), labels=self.labels[idx])


JPEG = (".jpg", ".jpeg")


def sample_seed(epoch_seed: int, index: int) -> int:
    """The seed of image `index`'s per-sample draws in the epoch whose draws derive from `epoch_seed`."""
    return (epoch_seed * 6_364_136_223_846_793_005 + index * 1_442_695_040_888_963_407) % 2**63


def _views(image: torch.Tensor, seed: int | None, policy: Policy | None, size: int,
           want_plain: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the image cropped by `policy` with the per-sample `seed`, or fitted when unseeded; the image fitted, when
    `want_plain`, else the first again)."""
    plain = fit(image, size) if seed is None or want_plain else None
    if seed is None:
        return plain, plain
    augmented = policy.crop(image, size, torch.Generator().manual_seed(seed))
    return augmented, plain if plain is not None else augmented


class _Files(torch.utils.data.Dataset):
    """Items are (image index, per-sample seed or None): its views (`_views`), or, for decoding on the training
    device, the file's bytes and the seed."""

    def __init__(self, split: FileSplit, policy: Policy | None, want_plain: bool, raw: bool):
        self.split, self.policy, self.want_plain, self.raw = split, policy, want_plain, raw

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int | None]):
        index, seed = item
        if self.raw:
            return read_bytes(self.split.files[index]), seed
        return _views(decode(self.split.files[index]), seed, self.policy, self.split.image_size, self.want_plain)


def _collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([a for a, _ in items])
    same = all(a is p for a, p in items)  # no second view asked for: one tensor, sent once
    return images, images if same else torch.stack([p for _, p in items])


def _concatenated(items: list[tuple[torch.Tensor, int | None]]) -> tuple[torch.Tensor, list[int], list[int | None]]:
    """A batch's files as one buffer, their lengths and seeds: one tensor crosses the process boundary, not one per
    file (each would hold a file descriptor while in flight)."""
    return torch.cat([data for data, _ in items]), [len(data) for data, _ in items], [seed for _, seed in items]


class _Plan(torch.utils.data.Sampler):
    """The batches the DataLoader fetches next: set before each pass, read in the main process."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int | None]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StreamLoader(BatchLoader):
    """`BatchLoader`'s batches of a `FileSplit`, decoded ahead by `split.workers` processes, or, for JPEGs of
    `LARGE_IMAGE_SIZE` px and more on CUDA, read by them and decoded on the GPU (`decode_on_device`: None decides
    so)."""

    def __init__(self, split: FileSplit, *, batch_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device | str = "cpu", shuffle: bool = False, augment: Policy | None = None,
                 seed: int = 0, channels_last: bool = False, strong: Policy | None = None, persistent: bool = False,
                 decode_on_device: bool | None = None):
        super().__init__(split, batch_size=batch_size, mean=mean, std=std, device=device, shuffle=shuffle,
                         augment=augment, seed=seed, channels_last=channels_last, strong=strong)
        if decode_on_device is None:  # measured (benchmarks/streaming.py, README): the GPU wins on large JPEGs only
            decode_on_device = (self.device.type == "cuda" and split.image_size >= LARGE_IMAGE_SIZE
                                and all(f.lower().endswith(JPEG) for f in split.files))
        self.decode_on_device = decode_on_device
        self.augments_in_fetch = self.augment.per_sample
        self.persistent = persistent and split.workers > 0
        self._plan = _Plan()
        self._loader: torch.utils.data.DataLoader | None = None

    def _hold(self, split: FileSplit) -> None:
        self.split = split  # its files are read batch by batch, never held

    def _fetch(self, chunks: list[torch.Tensor], augment: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        seeded = augment and self.augments_in_fetch
        self._plan.batches = [[(i, sample_seed(self.epoch_seed, i) if seeded else None) for i in idx.tolist()]
                              for idx in chunks]
        for idx, fetched in zip(chunks, self._dataloader()):
            images, plain = self._decode(fetched) if self.decode_on_device else fetched
            yield idx, self._floats(images), self._floats(plain)

    def _decode(self, files: tuple[torch.Tensor, list[int], list[int | None]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of JPEG files' bytes decoded on the training device, then cropped and fitted there."""
        from torchvision.io import ImageReadMode, decode_jpeg

        buffer, lengths, seeds = files
        decoded = decode_jpeg(list(buffer.split(lengths)), mode=ImageReadMode.RGB, device=self.device)
        policy = self.augment if self.augments_in_fetch else None
        return _collate([_views(image, seed, policy, self.split.image_size, self.strong is not None)
                         for image, seed in zip(decoded, seeds)])

    def _dataloader(self) -> torch.utils.data.DataLoader:
        if self._loader is None or not self.persistent:
            workers = self.split.workers
            self._loader = torch.utils.data.DataLoader(
                _Files(self.split, self.augment if self.augments_in_fetch else None, self.strong is not None,
                       raw=self.decode_on_device),
                batch_sampler=self._plan, num_workers=workers,
                collate_fn=_concatenated if self.decode_on_device else _collate, persistent_workers=self.persistent,
                pin_memory=self.device.type == "cuda" and not self.decode_on_device,
                prefetch_factor=4 if workers else None)
        return self._loader

    def _floats(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True).to(torch.float32).div_(255.0)


def loader_for(split, *, persistent: bool = False, **options) -> BatchLoader:
    """The loader of any split: a `StreamLoader` for a `FileSplit` (`persistent`: its decoding workers live as long as
    the loader, for a split read every epoch), else a `BatchLoader`."""
    if isinstance(split, FileSplit):
        return StreamLoader(split, persistent=persistent, **options)
    return BatchLoader(split, **options)
