"""Image trees streamed from disk: the same batches as held in memory, per-sample crops that resume exactly, the
memory budget that decides, and the mistakes a user can make with the options."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kdarena.methods.engine import eval_loader, training_loader
from kdarena.methods.replica import Replica
from kdarena.methods.recipe import Recipe
from kdarena.training.build import build_distiller, make_model
from kdarena.training.config import DatasetConfig, TrainConfig
from kdarena.training.logit_store import FOLDER
from kdarena.training.train_job import load_config_dataset
from kdarena.zoo.augment import CropFlip, RandomResizedCrop, Strong
from kdarena.zoo.data import Split, TreeOptions, load_dataset
from kdarena.zoo.errors import UserError
from kdarena.zoo.streaming import FileSplit

from helpers import assert_resumed_exactly, cli_train, uninterrupted_and_resumed, write_tree

@pytest.fixture(scope="module")
def one_size_tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("one-size"), (24, 24))


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("mixed"), (100, 160))


def _epoch(loader, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    loader.set_epoch(epoch)
    batches = list(loader.batches())
    strong = torch.cat([b.strong for b in batches]) if batches[0].strong is not None else torch.empty(0)
    return torch.cat([b.images for b in batches]), strong


def _loader(data, workers: int | None = None, **options):
    split = replace(data.train, workers=workers) if workers is not None else data.train
    return _train_loader(split, data, **options)


def _train_loader(split, data, augment=None, strong=None, seed: int = 5, batch_size: int = 8, **streamed):
    from kdarena.zoo.streaming import loader_for

    return loader_for(split, batch_size=batch_size, mean=data.mean, std=data.std, shuffle=True,
                      augment=augment or data.augment, seed=seed, strong=strong, persistent=True, **streamed)


def test_a_one_size_tree_streams_to_the_very_batches_it_gives_in_memory(one_size_tree):
    held = load_dataset("imagefolder", root=one_size_tree, tree=TreeOptions(in_memory=True))
    streamed = load_dataset("imagefolder", root=one_size_tree, tree=TreeOptions(in_memory=False, workers=2))
    assert isinstance(held.train, Split) and isinstance(streamed.train, FileSplit) and streamed.streamed
    # one dataset, whichever way it is read: its identity, split and statistics
    assert streamed.fingerprint == held.fingerprint
    assert (streamed.mean, streamed.std) == (held.mean, held.std)
    assert torch.equal(streamed.val.labels, held.val.labels) and len(streamed.train) == len(held.train) == 33
    assert (streamed.in_channels, streamed.input_size) == (held.in_channels, held.input_size) == (3, 24)
    strong = Strong(ops=2, magnitude=9)
    for epoch in (0, 3):
        a, b = _epoch(_loader(held, strong=strong), epoch), _epoch(_loader(streamed, strong=strong), epoch)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # crop + flip and the strong view, bit for bit
    for split in ("val", "test"):
        a = torch.cat([x for x, _ in eval_loader(getattr(held, split), held, torch.device("cpu"), batch_size=7)])
        b = torch.cat([x for x, _ in eval_loader(getattr(streamed, split), streamed, torch.device("cpu"), batch_size=7)])
        assert torch.equal(a, b)
    windows = [(w.indices, w.images) for w in _train_loader(streamed.train, streamed).windows()]
    assert [i.tolist() for i, _ in windows] == [w.indices.tolist() for w in _train_loader(held.train, held).windows()]


def test_a_tar_of_a_tree_is_read_in_place_as_the_tree_itself(one_size_tree, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    archive = tmp_path / "one-size.tar"
    with tarfile.open(archive, "w") as tar:
        for split in ("train", "test"):
            tar.add(one_size_tree / split, arcname=split)
    folder = load_dataset("imagefolder", root=one_size_tree, tree=TreeOptions(in_memory=False, workers=0))
    for in_memory in (False, True):
        packed = load_dataset("imagefolder", root=archive, tree=TreeOptions(in_memory=in_memory, workers=2))
        assert (packed.fingerprint, packed.mean, packed.std) == (folder.fingerprint, folder.mean, folder.std)
        assert torch.equal(_epoch(_loader(packed), 2)[0], _epoch(_loader(folder), 2)[0])
    assert not (tmp_path / "home" / ".cache" / "kdarena" / "data" / "extracted").exists()  # nothing unpacked
    # a member that would land outside the tree is refused as when unpacking, and nothing is read
    with tarfile.open(archive, "a") as tar:
        evil = tarfile.TarInfo("train/ant/../../../evil.jpg")
        tar.addfile(evil, io.BytesIO(b""))
    with pytest.raises(UserError, match="is refused: member 'train/ant/../../../evil.jpg' would be written outside"):
        load_dataset("imagefolder", root=archive, tree=TreeOptions(in_memory=False))


def test_per_sample_crops_depend_on_the_seed_and_epoch_alone(mixed_tree):
    data = load_dataset("imagefolder", root=mixed_tree, tree=TreeOptions(in_memory=False, image_size=96))
    assert data.augment == RandomResizedCrop()  # ImageNet's policy for images this large
    first, _ = _epoch(_loader(data, workers=0), 1)
    assert first.shape == (len(data.train), 3, 96, 96)
    assert torch.equal(first, _epoch(_loader(data, workers=2), 1)[0])  # however many processes decode
    assert torch.equal(first, _epoch(_loader(data, workers=2), 1)[0])  # a resumed epoch: the same images
    assert not torch.equal(first, _epoch(_loader(data, workers=2), 2)[0])
    # the CUDA path (workers read the bytes; the training device decodes, crops and fits), run here on the CPU
    assert torch.equal(first, _epoch(_loader(data, workers=2, decode_on_device=True), 1)[0])
    assert not torch.equal(first, _epoch(_loader(data, workers=2, seed=6), 1)[0])
    # validation images are fitted (shorter side resized, centre crop), never cropped at random
    val = torch.cat([x for x, _ in eval_loader(data.val, data, torch.device("cpu"))])
    again = torch.cat([x for x, _ in eval_loader(data.val, data, torch.device("cpu"))])
    assert val.shape[1:] == (3, 96, 96) and torch.equal(val, again)
    # held in memory, the same tree is the same data at the same size, its images fitted the same way
    held = load_dataset("imagefolder", root=mixed_tree, tree=TreeOptions(in_memory=True, image_size=96))
    assert (held.fingerprint, held.mean, held.std) == (data.fingerprint, data.mean, data.std)
    assert torch.equal(val, torch.cat([x for x, _ in eval_loader(held.val, held, torch.device("cpu"))]))


def test_a_replica_reads_only_its_rows_where_no_draw_depends_on_the_others(mixed_tree):
    data = load_dataset("imagefolder", root=mixed_tree, tree=TreeOptions(in_memory=False, image_size=96))
    whole = list(_train_loader(data.train, data).batches())
    for rank in (0, 1):
        replica = Replica(rank, 2)
        loader = _train_loader(data.train, data)
        assert loader.keep_rows(replica.own_rows)  # random_resized_crop: each image's crop is drawn from its seed
        for full, own in zip(whole, loader.batches(), strict=True):
            assert own.global_size == len(full.labels)
            assert torch.equal(own.images, replica.own_rows(full.images))
            assert torch.equal(own.indices, replica.own_rows(full.indices))
    # a batched policy draws for the whole batch: every row is read, and the replica selects after
    assert not _train_loader(data.train, data, augment=CropFlip()).keep_rows(Replica(0, 2).own_rows)


def test_auto_streams_a_tree_past_the_memory_budget_and_holds_one_within_it(one_size_tree):
    decoded_mb = 36 * 3 * 24 * 24 / 2**20  # the full training split, before validation is carved out
    below = load_config_dataset(DatasetConfig(name="imagefolder", root=str(one_size_tree),
                                              memory_budget_mb=decoded_mb * 0.9))
    above = load_config_dataset(DatasetConfig(name="imagefolder", root=str(one_size_tree),
                                              memory_budget_mb=decoded_mb * 1.1))
    assert below.streamed and not above.streamed
    assert below.reading != above.reading  # a teacher trained on one is not taken for the other


def _tree_config(root: Path, **train) -> TrainConfig:
    return TrainConfig.model_validate({
        "dataset": {"name": "imagefolder", "root": str(root), "in_memory": False, "workers": 2, "image_size": 96},
        "teacher": {"arch": "cnn"}, "student": {"arch": "cnn", "options": {"channels": 4}},
        "method": {"name": "kd"}, "train": {"epochs": 2, "batch_size": 16, **train}})


def test_a_streamed_fit_with_per_sample_crops_resumes_exactly(mixed_tree, tmp_path):
    cfg = _tree_config(mixed_tree)
    data = load_config_dataset(cfg.dataset)
    teacher = make_model(cfg.teacher, data, 0).eval()
    full, resumed = uninterrupted_and_resumed(lambda: build_distiller(cfg, data, teacher), data, cfg.train, tmp_path)
    assert full.status == "completed" and len(full.history) == 2
    assert_resumed_exactly(full, resumed, fields=("val_acc", "losses", "train_acc"))
    assert isinstance(training_loader(build_distiller(cfg, data, teacher), data, Recipe(), torch.device("cpu")).augment,
                      RandomResizedCrop)


def test_kdarena_train_streams_a_tree_and_reads_cached_teacher_logits(mixed_tree, migrated_store):
    result = cli_train("dataset.name=imagefolder", f"dataset.root={mixed_tree}", "dataset.in_memory=false",
                                "dataset.image_size=32", "dataset.workers=1", "teacher.recipe.epochs=1",
                                "train.epochs=2", "train.augment=none", "train.batch_size=16", json_summary=True)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert f"{mixed_tree.name}: 33 training images at 32 px, streamed from disk by 1 decoding worker (" in result.stderr
    assert summary["status"] == "completed" and summary["dataset_label"] == mixed_tree.name
    assert summary["test_acc"] is not None
    # kd without augmentation took its teacher's logits from the store, computed over the streamed split once
    assert len(list((migrated_store / "teachers" / FOLDER).glob("*.pt"))) == 1


@pytest.mark.parametrize("settings, named", [
    (("dataset.in_memory=false",), "in_memory: false applies to dataset imagefolder only"),
    (("dataset.image_size=64", "dataset.workers=2"), "image_size, workers apply to dataset imagefolder only"),
    (("dataset.name=imagefolder", "dataset.root=/x", "dataset.image_size=4"), "image_size"),
    (("dataset.name=imagefolder", "dataset.root=/x", "dataset.memory_budget_mb=0"), "memory_budget_mb"),
    (("dataset.name=imagefolder", "dataset.root=/x", "dataset.in_memory=sometimes"), "in_memory"),
    (("train.augment={policy: random_resized_crop, scale: [0.9, 0.2]}",), "scale[0] <= scale[1]"),
])
def test_tree_options_out_of_place_or_range_exit_2_naming_them(settings, named):
    refused = cli_train(*settings)
    assert refused.exit_code == 2, refused.output
    assert named in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
