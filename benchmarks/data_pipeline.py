"""One training epoch of CIFAR-sized data: kdarena's in-memory tensor pipeline vs a torchvision DataLoader.

Both feed the same model with the same augmentation (random crop with 4-pixel
padding, horizontal flip, normalisation); only the data path differs. Uses
an image tree given with --archive (e.g. a CIFAR-10 JPEG copy,
`train|test/<class>/*.jpg` or a .tar.gz of one) when given, else random
uint8 images of CIFAR's shape. Prints images/s of each and their ratio.

    python -m benchmarks.data_pipeline [--archive PATH] [--limit N] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision import transforms

from kdarena.zoo.augment import CropFlip
from kdarena.zoo.data import BatchLoader, Split, load_dataset
from kdarena.zoo.models import build_model



class PerSampleDataset(torch.utils.data.Dataset):
    """The classic pipeline: a PIL image per sample through torchvision transforms."""

    def __init__(self, split: Split, mean, std):
        self.images = split.images.permute(0, 2, 3, 1).numpy()
        self.labels = split.labels.numpy()
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(mean, std),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _epoch(batches, model, optimizer) -> tuple[int, float]:
    model.train()
    seen, start = 0, time.perf_counter()
    for images, labels in batches:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += labels.numel()
    return seen, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=None, help="an image tree (or .tar.gz of one) to read")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers to try")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--channels", type=int, default=16, help="width of the CNN both pipelines feed")
    args = parser.parse_args()

    if args.archive is not None:
        data = load_dataset("imagefolder", root=args.archive)
        split, mean, std = data.train, data.mean, data.std
        source = f"CIFAR-10 JPEG copy ({args.archive.name})"
    else:
        gen = torch.Generator().manual_seed(0)
        split = Split(torch.randint(0, 256, (45_000, 3, 32, 32), dtype=torch.uint8, generator=gen),
                      torch.randint(0, 10, (45_000,), generator=gen))
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        source = "random uint8 tensors of CIFAR-10's shape"
    if args.limit:
        split = Split(split.images[: args.limit], split.labels[: args.limit])

    def fresh():
        torch.manual_seed(0)
        model = build_model("cnn", num_classes=10, in_channels=3, input_size=32, channels=args.channels)
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    print(f"data: {source}; {len(split)} training images; model cnn(channels={args.channels}); "
          f"torch threads {torch.get_num_threads()}")
    model, opt = fresh()
    tensor_loader = BatchLoader(split, batch_size=args.batch_size, mean=mean, std=std, shuffle=True,
                                augment=CropFlip(padding=4, flip=True))
    _epoch(list(tensor_loader)[:3], model, opt)  # warm-up: allocator and kernels
    n, secs = _epoch(tensor_loader, *fresh())
    tensor_rate = n / secs
    print(f"in-memory tensor pipeline: {tensor_rate:,.0f} img/s ({secs:.1f} s)")

    best = 0.0
    for workers in args.workers:
        loader = DataLoader(PerSampleDataset(split, mean, std), batch_size=args.batch_size, shuffle=True,
                            num_workers=workers, persistent_workers=False)
        n, secs = _epoch(loader, *fresh())
        rate = n / secs
        best = max(best, rate)
        print(f"DataLoader, per-sample transforms, num_workers={workers}: {rate:,.0f} img/s ({secs:.1f} s)")
    print(f"ratio (tensor pipeline / best DataLoader): {tensor_rate / best:.2f}x")


if __name__ == "__main__":
    main()
