"""Augmentation policies: named, validated, and run as batched tensor ops on the training device.

A recipe's `augment:` names one policy (a string, or a mapping with its
options); without one, the dataset's own default applies (crop + flip for
natural images, crop without flip for SVHN's digits, none for digit-like
data). Every policy works on a float batch in [0, 1] before normalisation
and draws all its randomness from the one `torch.Generator` it is given, so
the batches of epoch `e` depend only on (seed, e) and a resumed run sees the
very same images.

- `none`: the images as they are.
- `crop_flip`: zero-pad `padding` px per side, crop back at a random offset
  per image; mirror left-right with probability ½ when `flip`.
- `translate`: shift each image by up to ±`shift` px in each direction
  (zero fill); never mirrors, so glyphs keep their handedness.
- `random_resized_crop`: a random box of `scale` of the image's area and
  `ratio` width:height, resized to the image's side; mirrored with
  probability ½ when `flip`. The default for images of `LARGE_IMAGE_SIZE` px
  and more (ImageNet-style); a streamed dataset draws the box from the image
  file at its own size, before it is resized (`zoo/streaming.py`).
- `strong`: `crop_flip`, then `ops` operations per image drawn uniformly from
  a RandAugment-style set (identity, auto-contrast, equalise, rotate,
  solarise, colour, posterise, contrast, brightness, sharpness, shear x/y,
  translate x/y) at `magnitude` on RandAugment's 0–30 scale; signed
  operations take a random sign per image. MLKD's strong view uses it.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal, Union

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, model_validator
from torch.nn import functional as F


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    per_sample: ClassVar[bool] = False  # False: a batched tensor op on images of one size

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """`x` (B×C×H×W floats in [0, 1]) augmented; randomness only from `gen`."""
        raise NotImplementedError


class NoAugment(Policy):
    policy: Literal["none"] = "none"

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return x


class CropFlip(Policy):
    policy: Literal["crop_flip"] = "crop_flip"
    padding: int = Field(4, ge=0, le=64, description="zero padding per side before the random crop, px")
    flip: bool = Field(True, description="mirror left-right with probability 1/2")

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.padding:
            x = random_crop(x, self.padding, gen)
        if self.flip:
            x = random_flip(x, gen)
        return x


class Translate(Policy):
    policy: Literal["translate"] = "translate"
    shift: int = Field(2, ge=1, le=64, description="largest shift in each direction, px")

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # a crop of the zero-padded image at offset o is the image shifted by (shift - o) px
        return random_crop(x, self.shift, gen)


class Strong(Policy):
    policy: Literal["strong"] = "strong"
    padding: int = Field(4, ge=0, le=64, description="crop padding before the operations, px")
    flip: bool = Field(True, description="mirror left-right with probability 1/2 before the operations")
    ops: int = Field(2, ge=1, le=10, description="operations per image")
    magnitude: float = Field(9.0, ge=0, le=30, description="RandAugment's magnitude, 0-30")

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = CropFlip(padding=self.padding, flip=self.flip).apply(x, gen)
        for _ in range(self.ops):
            x = _rand_ops(x, self.magnitude / 30.0, gen)
        return x


# the side, px, from which an image tree's default policy is `random_resized_crop` rather than `crop_flip`
LARGE_IMAGE_SIZE = 96


class RandomResizedCrop(Policy):
    policy: Literal["random_resized_crop"] = "random_resized_crop"
    scale: tuple[float, float] = Field((0.08, 1.0), description="the box's share of the image's area: lowest, highest")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="the box's width:height: lowest, highest")
    flip: bool = Field(True, description="mirror left-right with probability 1/2")

    per_sample: ClassVar[bool] = True  # a streamed dataset applies it to each decoded file, at the file's own size

    @model_validator(mode="after")
    def _ordered(self) -> RandomResizedCrop:
        if not (0 < self.scale[0] <= self.scale[1] <= 1 and 0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"random_resized_crop needs 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], "
                             f"got scale {list(self.scale)}, ratio {list(self.ratio)}")
        return self

    def box(self, height: int, width: int, gen: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, box height, box width) of one image: up to ten draws of area and aspect that fit, else the
        largest centred box within the ratio range."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            u = torch.rand(2, generator=gen, dtype=torch.float64, device=gen.device).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_lo + u[1] * (log_hi - log_lo))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=gen, device=gen.device))
                left = int(torch.randint(0, width - w + 1, (1,), generator=gen, device=gen.device))
                return top, left, h, w
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def crop(self, image: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
        """One image (C×H×W, uint8 or float) cropped, resized to size×size and perhaps mirrored; randomness from
        `gen` alone."""
        from torchvision.transforms.v2 import functional as TF

        top, left, h, w = self.box(image.shape[-2], image.shape[-1], gen)
        out = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        if self.flip and bool(torch.rand((), generator=gen, device=gen.device) < 0.5):
            out = out.flip(-1)
        return out

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return torch.stack([self.crop(image, x.shape[-1], gen) for image in x])


def default_policy(image_size: int) -> CropFlip | RandomResizedCrop:
    """An image tree's policy when the recipe names none: ImageNet's for large images, CIFAR's for small ones."""
    if image_size >= LARGE_IMAGE_SIZE:
        return RandomResizedCrop()
    return CropFlip(padding=max(1, image_size // 8), flip=True)


def _named(value: Any) -> Any:
    """`augment: translate` is short for `augment: {policy: translate}`."""
    return {"policy": value} if isinstance(value, str) else value


# a recipe's `augment:` field: a policy by name, or a mapping with its options
AugmentPolicy = Annotated[Annotated[Union[NoAugment, CropFlip, Translate, Strong, RandomResizedCrop], Field(discriminator="policy")],
                          BeforeValidator(_named)]


def parse_policy(value: Any) -> Policy:
    """A policy from its name or mapping (what a recipe's `augment:` holds)."""
    return TypeAdapter(AugmentPolicy).validate_python(value)


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


# -- the strong policy's operations --------------------------------------------------------------------------------
# Each takes the images that drew it, the magnitude as a fraction (0..1) and a ±1 sign per image, at
# RandAugment's ranges (torchvision's `RandAugment` at 31 bins): shear 0.3, translate 0.45 of the side,
# rotate 30°, brightness/colour/contrast/sharpness ±0.9, posterise down to 4 bits, solarise from 1.0 down to 0.
def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """`b + factor·(a − b)` clipped to [0, 1]: PIL's ImageEnhance with `a` the image and `b` the degenerate one."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp_(0.0, 1.0)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _eye(n: int, x: torch.Tensor) -> torch.Tensor:
    return torch.eye(2, 3, device=x.device, dtype=x.dtype).expand(n, 2, 3).clone()


def _shear(x, m, sign, axis):
    theta = _eye(len(x), x)
    theta[:, axis, 1 - axis] = 0.3 * m * sign
    return _affine(x, theta)


def _translate(x, m, sign, axis):
    theta = _eye(len(x), x)
    theta[:, axis, 2] = 2 * 0.45 * m * sign  # affine_grid's coordinates span 2 per side
    return _affine(x, theta)


def _rotate(x, m, sign):
    angle = math.radians(30.0 * m) * sign
    theta = torch.zeros(len(x), 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 1] = angle.cos(), -angle.sin()
    theta[:, 1, 0], theta[:, 1, 1] = angle.sin(), angle.cos()
    return _affine(x, theta)


def _enhance(kind: str):
    def op(x, m, sign):
        factor = 1.0 + 0.9 * m * sign
        if kind == "brightness":
            degenerate = torch.zeros_like(x)
        elif kind == "color":
            degenerate = _gray(x).expand_as(x)
        elif kind == "contrast":
            degenerate = _gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
        else:  # sharpness: PIL's 3×3 smoothing kernel, the border left as it is
            kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device, dtype=x.dtype) / 13
            c = x.shape[1]
            smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), padding=1, groups=c)
            degenerate = x.clone()
            degenerate[..., 1:-1, 1:-1] = smooth[..., 1:-1, 1:-1]
        return _blend(x, degenerate, factor)
    return op


def _solarize(x, m, sign):
    threshold = 1.0 - m
    return torch.where(x >= threshold, 1.0 - x, x)


def _posterize(x, m, sign):
    bits = 8 - int(round(4 * m))
    shift = 8 - bits
    q = (x * 255).round().to(torch.int32)
    return ((q >> shift) << shift).to(x.dtype) / 255


def _autocontrast(x, m, sign):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 1.0 / (hi - lo).clamp_min(1e-12), torch.ones_like(hi))
    offset = torch.where(hi > lo, lo, torch.zeros_like(lo))
    return ((x - offset) * scale).clamp_(0.0, 1.0)


def _equalize(x, m, sign):
    """Per image and channel, pixel levels mapped through their cumulative histogram (PIL's equalise)."""
    b, c, h, w = x.shape
    q = (x * 255).round().to(torch.int64).view(b * c, h * w)
    hist = torch.zeros(b * c, 256, device=x.device, dtype=torch.float32).scatter_add_(
        1, q, torch.ones_like(q, dtype=torch.float32))
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float("inf"))).amin(1, keepdim=True)
    span = (h * w - cdf_min).clamp_min(1)
    lut = ((cdf - cdf_min) / span * 255).clamp_(0, 255).round()
    out = lut.gather(1, q).view(b, c, h, w).to(x.dtype) / 255
    flat = span.view(b, c, 1, 1) <= 1  # one level only: nothing to spread
    return torch.where(flat, x, out)


_OPS = (
    lambda x, m, s: x,  # identity
    _autocontrast, _equalize, _rotate, _solarize, _enhance("color"), _posterize, _enhance("contrast"),
    _enhance("brightness"), _enhance("sharpness"),
    lambda x, m, s: _shear(x, m, s, 0), lambda x, m, s: _shear(x, m, s, 1),
    lambda x, m, s: _translate(x, m, s, 0), lambda x, m, s: _translate(x, m, s, 1),
)


def _rand_ops(x: torch.Tensor, m: float, gen: torch.Generator) -> torch.Tensor:
    """One operation per image, each image's drawn apart; every image keeps its place in the batch."""
    b = x.shape[0]
    choice = torch.randint(0, len(_OPS), (b,), generator=gen, device=x.device)
    sign = torch.where(torch.rand(b, generator=gen, device=x.device) < 0.5, -1.0, 1.0).to(x.dtype)
    out = x.clone()
    for k, op in enumerate(_OPS):
        idx = (choice == k).nonzero().flatten()
        if k == 0 or idx.numel() == 0:
            continue
        out[idx] = op(x[idx], m, sign[idx])
    return out
