"""Images/s of a training epoch's batches, held in memory vs streamed from disk with 0, 1, 2… decoding workers.

Two trees: the CIFAR-10 JPEG copy (`--cifar`, a .tar.gz or folder of
`train|test/<class>/*.jpg`, 32×32; crop + flip on the device) and a synthetic
ImageNet-size tree written here (`--imagenet-images` JPEGs of 300–500 px a
side, read at 224 px; random_resized_crop per image in the workers). For
each: the first load (indexing, and decoding where held in memory), then
the batches of one epoch as the engine's training loader gives them
(augmented, normalised, on the CPU), without a model: what the data path
alone can feed; with `--model`, also an epoch of that model's training
steps on the CIFAR tree, where the workers share the cores with the step.

    python -m benchmarks.streaming [--cifar DIR/cifar10-jpeg.tar.gz] [--workers 0 1 2] [--model cnn] [--device cuda]

It imports only `zoo/` (torch, torchvision, pydantic), so it runs where a GPU is lent; `--device cuda` adds the
rows where the workers only read the files and the GPU decodes them.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from torchvision.io import encode_jpeg

from kdarena.zoo.data import Dataset, TreeOptions, load_dataset
from kdarena.zoo.models import build_model
from kdarena.zoo.streaming import loader_for


def synthetic_tree(root: Path, images: int, classes: int = 10) -> Path:
    """`images` training and `images // 5` test JPEGs of smooth random content, 300–500 px a side."""
    gen, rnd = torch.Generator().manual_seed(0), random.Random(0)
    for split, n in (("train", images), ("test", images // 5)):
        for i in range(n):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = rnd.randint(300, 500), rnd.randint(300, 500)
            low = torch.rand((1, 3, h // 16 + 2, w // 16 + 2), generator=gen) * 255
            image = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic")[0].clamp(0, 255).to(torch.uint8)
            (folder / f"{i:06d}.jpg").write_bytes(encode_jpeg(image, quality=85).numpy().tobytes())
    return root


def epoch_rate(data: Dataset, batch_size: int, model: str | None, device: torch.device, **streamed) -> float:
    """Images/s of one epoch of training batches on `device`, and of training steps of `model` on them when one is
    named (the better of two epochs: decoding workers already up in the second)."""
    loader = loader_for(data.train, batch_size=batch_size, mean=data.mean, std=data.std, shuffle=True,
                        augment=data.augment, seed=0, persistent=True, channels_last=model is not None,
                        device=device, **streamed)
    net = None
    if model is not None:
        net = build_model(model, num_classes=data.num_classes, in_channels=3, input_size=data.input_size)
        net = net.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    best = 0.0
    for epoch in range(2):
        loader.set_epoch(epoch)
        start, seen = time.perf_counter(), 0
        for batch in loader.batches():
            if net is not None:
                loss = torch.nn.functional.cross_entropy(net(batch.images), batch.labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            seen += batch.labels.numel()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, seen / (time.perf_counter() - start))
    return best


def compare(name: str, root: Path, image_size: int | None, workers: list[int], batch_size: int,
            model: str | None, device: torch.device) -> None:
    rows = []
    start = time.perf_counter()
    held = load_dataset("imagefolder", root=root, tree=TreeOptions(in_memory=True, image_size=image_size))
    first_held = time.perf_counter() - start
    rows.append(("in memory", first_held, epoch_rate(held, batch_size, model, device)))
    for count in workers:
        start = time.perf_counter()
        streamed = load_dataset("imagefolder", root=root, tree=TreeOptions(in_memory=False, image_size=image_size,
                                                                         workers=count))
        load_s = time.perf_counter() - start
        for on_device in (False, True) if device.type == "cuda" else (False,):
            rows.append((f"streamed, {count} workers{', GPU decode' if on_device else ''}", load_s,
                         epoch_rate(streamed, batch_size, model, device, decode_on_device=on_device)))
    print(f"\n{name}: {len(held.train)} training images at {held.input_size} px, policy {held.augment.policy}, "
          f"batch {batch_size}, torch threads {torch.get_num_threads()}, "
          f"{'training steps of ' + model if model else 'batches alone, no model'}")
    print(f"{'path (' + device.type + ')':<36}{'load, s':>10}{'images/s':>12}{'÷ in memory':>13}")
    for label, load_s, rate in rows:
        print(f"{label:<36}{load_s:>10.1f}{rate:>12.0f}{rate / rows[0][2]:>13.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, default=None, help="the CIFAR-10 JPEG tree or a .tar.gz of it")
    parser.add_argument("--imagenet-images", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default=None, help="also train this zoo model on the batches (CIFAR tree only)")
    parser.add_argument("--device", default="cpu", help="where batches go: cpu, or cuda (adds GPU-decoded rows)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.cifar is not None:
        compare(f"CIFAR-10 JPEG copy ({args.cifar.name})", args.cifar, None, args.workers, args.batch_size, None,
                device)
        if args.model:
            compare(f"CIFAR-10 JPEG copy ({args.cifar.name})", args.cifar, None, args.workers, args.batch_size,
                    args.model, device)
    with tempfile.TemporaryDirectory(prefix="kdarena-imagenet-size-") as tmp:
        root = synthetic_tree(Path(tmp), args.imagenet_images)
        compare("synthetic ImageNet-size tree", root, 224, args.workers, args.batch_size, None, device)


if __name__ == "__main__":
    main()
