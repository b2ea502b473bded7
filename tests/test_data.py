from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kdarena.zoo.augment import CropFlip, random_crop, random_flip
from kdarena.zoo.data import BatchLoader, load_dataset
from helpers import shifted as _shifted


def _ids(split) -> set[bytes]:
    return {bytes(img.flatten().tolist()) + bytes([int(lbl)]) for img, lbl in zip(split.images, split.labels)}


def test_digits_splits_are_disjoint_uint8_and_sized(digits):
    assert digits.train.images.dtype == torch.uint8
    assert digits.train.images.shape[1:] == (1, 8, 8)
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert abs(len(digits.val) - 0.1 * (len(digits.train) + len(digits.val))) <= 1
    # the index sets are disjoint by construction; check the content too (digits has a few duplicate images)
    train, val, test = _ids(digits.train), _ids(digits.val), _ids(digits.test)
    overlap = len(train & val) + len(train & test) + len(val & test)
    assert overlap <= 5


def test_split_is_deterministic_and_seeded():
    a, b = load_dataset("digits", split_seed=3), load_dataset("digits", split_seed=3)
    c = load_dataset("digits", split_seed=4)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.val.labels, c.val.labels)
    # the test split never depends on the validation seed
    assert torch.equal(a.test.images, c.test.images)


def test_loader_epoch_order_depends_only_on_seed_and_epoch(digits):
    def labels(epoch: int) -> torch.Tensor:
        loader = BatchLoader(digits.train, batch_size=64, mean=digits.mean, std=digits.std, shuffle=True, seed=7)
        loader.set_epoch(epoch)
        return torch.cat([y for _, y in loader])

    assert torch.equal(labels(2), labels(2))
    assert not torch.equal(labels(1), labels(2))
    assert sorted(labels(1).tolist()) == sorted(digits.train.labels.tolist())


def test_loader_normalises_with_train_statistics(digits):
    loader = BatchLoader(digits.train, batch_size=10_000, mean=digits.mean, std=digits.std)
    x, _ = next(iter(loader))
    assert x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2


def test_random_crop_shifts_each_image_by_its_own_offset():
    gen = torch.Generator().manual_seed(0)
    n, size, pad = 64, 6, 2
    x = torch.arange(n * size * size, dtype=torch.float32).view(n, 1, size, size) + 1
    out = random_crop(x, pad, gen)
    assert out.shape == x.shape
    offsets = set()
    for img, src in zip(out, x):
        # the crop is the source shifted by one (dy, dx) in [-pad, pad]², zeros where it left the frame
        matches = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
                   if torch.equal(img, _shifted(src, dy, dx))]
        assert len(matches) == 1, "each crop is exactly one shift of its own image"
        offsets.add(matches[0])
    assert (0, 0) in offsets or len(offsets) > 1
    assert len(offsets) >= 15, "64 images draw most of the 25 possible shifts, each its own"


def test_random_flip_mirrors_about_half():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(1000 * 4, dtype=torch.float32).view(1000, 1, 1, 4)
    out = random_flip(x, gen)
    flipped = (out[:, 0, 0, 0] != x[:, 0, 0, 0]).float().mean()
    assert 0.4 < float(flipped) < 0.6
    assert torch.equal(out[out[:, 0, 0, 0] != x[:, 0, 0, 0]], x[out[:, 0, 0, 0] != x[:, 0, 0, 0]].flip(3))


def test_natural_image_augmentation_changes_batches_but_not_eval(digits):
    aug = BatchLoader(digits.train, batch_size=32, mean=digits.mean, std=digits.std, augment=CropFlip(padding=2, flip=True),
                      seed=1)
    plain = BatchLoader(digits.train, batch_size=32, mean=digits.mean, std=digits.std)
    xa, ya = next(iter(aug))
    xp, yp = next(iter(plain))
    assert torch.equal(ya, yp) and not torch.equal(xa, xp)


DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist package (.ci/run installs it)")
def test_fashion_mnist_loads_offline_from_debians_package(tmp_path):
    # the layout an earlier kdarena left behind: Debian's .gz files copied as they are, which torchvision's md5
    # check refuses (Debian rewrote their gzip headers), so it tried to download
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in DEBIAN_FASHION.glob("*.gz"):
        shutil.copy(f, raw / f.name)
    data = load_dataset("fashion-mnist", root=tmp_path, download=False)
    assert (len(data.train) + len(data.val), len(data.test), data.num_classes) == (60_000, 10_000, 10)
    assert data.label == "fashion-mnist" and data.train.images.shape[1:] == (1, 28, 28)
    # the same content wherever it is read from: the identity of the data, not of the folder
    assert load_dataset("fashion-mnist", root=tmp_path / "elsewhere", download=False).fingerprint == data.fingerprint
