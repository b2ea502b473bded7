"""Augmentation policies: what each does to a batch, that a seed fixes it, that a resumed run sees the same images,
and that a recipe chooses it (a teacher may train with more than its students)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from kdarena.methods.baseline import Baseline
from kdarena.methods.engine import fit
from kdarena.methods.recipe import Recipe
from kdarena.zoo.augment import CropFlip, NoAugment, Strong, Translate, parse_policy
from kdarena.zoo.data import BatchLoader
from helpers import CPU, digits_model, digits_pair, shifted as _shift, uninterrupted_and_resumed

POLICIES = [NoAugment(), CropFlip(padding=2), Translate(shift=2), Strong(padding=1, ops=2, magnitude=9)]


def _images(n: int = 32, c: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.policy)
def test_every_policy_keeps_the_batch_shape_and_pixel_range(policy):
    x = _images()
    out = policy.apply(x, _gen())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.policy)
def test_a_seed_fixes_the_augmentation_and_another_seed_changes_it(policy):
    x = _images()
    assert torch.equal(policy.apply(x, _gen(3)), policy.apply(x, _gen(3)))
    if policy.policy != "none":
        assert not torch.equal(policy.apply(x, _gen(3)), policy.apply(x, _gen(4)))
    else:
        assert torch.equal(policy.apply(x, _gen(3)), x)


def test_translate_shifts_each_image_within_its_range_and_never_mirrors():
    # images that are not left-right symmetric: a mirror would be no shift of them
    x = _images(n=64, c=1, size=6, seed=1)
    out = Translate(shift=2).apply(x, _gen())
    shifts = set()
    for img, src in zip(out, x):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(img, _shift(src, dy, dx))]
        assert len(found) == 1, "each image is one shift of itself, never a mirror"
        mirrored = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                    if torch.equal(img, _shift(src.flip(-1), dy, dx))]
        assert not mirrored
        shifts.add(found[0])
    assert len(shifts) >= 15  # each image draws its own shift


def test_crop_flip_mirrors_about_half_the_images():
    x = _images(n=400, c=1, size=6, seed=2)
    out = CropFlip(padding=0, flip=True).apply(x, _gen())
    mirrored = sum(torch.equal(o, s.flip(-1)) for o, s in zip(out, x))
    assert 150 < mirrored < 250


def test_strong_applies_its_operations_per_image():
    x = _images(n=64, seed=3)
    out = Strong(padding=0, flip=False, ops=1, magnitude=20).apply(x, _gen())
    changed = [not torch.equal(o, s) for o, s in zip(out, x)]
    # one operation in 14 is the identity: most images change, some do not, each by its own draw
    assert 40 <= sum(changed) < 64
    # an image's result does not depend on the rest of the batch's content
    alone = Strong(padding=0, flip=False, ops=1, magnitude=20).apply(x.clone(), _gen())
    assert torch.equal(alone, out)


def test_policies_are_named_validated_and_read_from_a_name_or_a_mapping():
    assert parse_policy("translate") == Translate(shift=2)
    assert parse_policy({"policy": "crop_flip", "padding": 4, "flip": False}) == CropFlip(padding=4, flip=False)
    assert Recipe(augment="strong").augment == Strong()
    assert Recipe(augment={"policy": "translate", "shift": 3}).augment == Translate(shift=3)
    with pytest.raises(ValidationError, match="translate"):  # the message lists the known policies
        Recipe(augment="rotate")
    with pytest.raises(ValidationError, match="extra"):  # a crop option on translate is a mistake, not ignored
        Recipe(augment={"policy": "translate", "padding": 4})
    with pytest.raises(ValidationError):
        Recipe(augment={"policy": "translate", "shift": 0})


def test_a_recipe_without_augment_uses_the_datasets_default(digits):
    assert Recipe().augment_for(digits) == NoAugment() == digits.augment
    assert Recipe(augment="translate").augment_for(digits) == Translate()


def test_the_strong_view_leaves_the_first_views_batches_as_they_were(digits):
    def first(strong):
        loader = BatchLoader(digits.train, batch_size=64, mean=digits.mean, std=digits.std, shuffle=True,
                             augment=Translate(), seed=5, strong=strong)
        loader.set_epoch(2)
        return next(iter(loader.batches()))

    plain, both = first(None), first(Strong())
    assert torch.equal(plain.images, both.images) and torch.equal(plain.labels, both.labels)
    assert plain.strong is None and both.strong.shape == both.images.shape
    assert not torch.equal(both.strong, both.images)


@pytest.mark.parametrize("augment", ["translate", "strong"])
def test_a_resumed_run_sees_exactly_the_augmented_batches_of_an_uninterrupted_one(digits, tmp_path, augment):
    recipe = Recipe(epochs=3, batch_size=128, augment=augment)

    def make():
        model = digits_model("cnn", 0, channels=4)
        return Baseline(model, None, Baseline.Params(), digits_pair(model, model))

    full, resumed = uninterrupted_and_resumed(make, digits, recipe, tmp_path, stop_after=1)
    assert [e.val_acc for e in full.history] == [e.val_acc for e in resumed.history]
    assert [e.losses for e in full.history] == [e.losses for e in resumed.history]
    assert full.test_acc == resumed.test_acc


def test_the_recipe_policy_is_what_training_sees(digits):
    """Two recipes differing only in augment train differently; the same recipe twice trains identically."""
    def run(augment):
        model = digits_model("cnn", 0, channels=4)
        return fit(Baseline(model, None, Baseline.Params(), digits_pair(model, model)), digits,
                   Recipe(epochs=1, batch_size=128, augment=augment), device=CPU).history[0].losses["loss_ce"]

    assert run("translate") == run("translate")
    assert run("translate") != run("none")
