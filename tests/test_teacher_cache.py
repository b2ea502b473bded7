"""The teacher-output cache: the logit methods trained from cached teacher logits end bit for bit where they end with
the teacher run every step (resumed or not); the cache is used only where the method and the recipe allow it; logits
computed another way, or another machine's, are never trusted; a damaged stored file is computed again."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kdarena.methods import METHODS, Distiller
from kdarena.methods.engine import compute_teacher_logits, fit
from kdarena.methods.execution import Execution
from kdarena.methods.kd import KD
from kdarena.methods.recipe import Recipe
from kdarena.methods.teacher_logits import cacheable
from kdarena.training.config import parse_config
from kdarena.training.logit_store import stored_teacher_logits
from kdarena.training.teacher_store import StoredTeacher

from helpers import CPU, assert_resumed_exactly, assert_same_state, digits_model, digits_pair, uninterrupted_and_resumed

LOGIT_METHODS = {"kd": {}, "kd-logit-std": {"logit_std": True}, "dkd": {}, "dist": {}, "ctkd": {},
                 "adversarial": {"kd_weight": 0.5}}
TEACHERS = {"cnn": {"channels": 16}, "mlp": {"hidden": [64, 32]}}  # a conv teacher and a GEMM-only one
FLOAT32 = Execution.default(CPU)
CUDA_SETTINGS_ON_CPU = Execution(CPU, bf16=True, channels_last=True)


def _method(name: str) -> type[Distiller]:
    return METHODS[name.split("-")[0]]


def _live(cls: type[Distiller]) -> type[Distiller]:
    """`cls` not declaring that it reads only the teacher's logits: the engine runs the teacher every step."""
    return type(f"Live{cls.__name__}", (cls,), {"teacher_logits_only": False})


class Teacher:
    """A digits teacher, its pair with the 4-channel cnn student, and the size of each batch it has run on since."""

    def __init__(self, arch: str = "cnn"):
        self.model = digits_model(arch, 0, **TEACHERS[arch]).eval()
        self.pair = digits_pair(digits_model("cnn", 1, channels=4), self.model)  # its dry runs are not counted
        self.seen: list[int] = []
        first = next(m for m in self.model.modules() if list(m.parameters(recurse=False)))
        first.register_forward_pre_hook(lambda module, args: self.seen.append(int(args[0].shape[0])))

    def distiller(self, cls: type[Distiller], **params) -> Distiller:
        """`cls` over a fresh student (cnn, 4 channels, seed 1) and this teacher."""
        return cls(digits_model("cnn", 1, channels=4), self.model, cls.Params(**params), self.pair)

    def fit(self, cls: type[Distiller], data, recipe: Recipe, execution: Execution = FLOAT32, **params):
        """(distiller, FitResult) of `cls` trained by `recipe` under `execution`."""
        distiller = self.distiller(cls, **params)
        return distiller, fit(distiller, data, recipe, execution=execution)

    def calls(self) -> list[int]:
        """The batch sizes seen since the last call."""
        seen, self.seen[:] = list(self.seen), []
        return seen


def _assert_same_run(a, b) -> None:
    """Two (distiller, FitResult) pairs ended alike: every weight and buffer, every epoch's numbers, test accuracy."""
    assert_same_state(a[0], b[0])
    assert_resumed_exactly(a[1], b[1], fields=("losses", "diagnostics", "train_acc", "val_acc"))
    assert a[1].test_acc == b[1].test_acc


# batch 64 leaves a last batch of 15 of digits' 1295 training images, 647 a last batch of 1: a size at which GEMM's
# bits differ from a full batch's, so the last batch must run the teacher
@pytest.mark.parametrize("batch_size", [64, 647])
@pytest.mark.parametrize("teacher_arch", list(TEACHERS))
@pytest.mark.parametrize("name", list(LOGIT_METHODS))
def test_cached_logits_train_bit_for_bit_as_the_teacher_run_every_step(name, teacher_arch, batch_size, digits):
    recipe = Recipe(epochs=2, batch_size=batch_size)
    teacher = Teacher(teacher_arch)
    cached = teacher.fit(_method(name), digits, recipe, **LOGIT_METHODS[name])
    calls_cached = teacher.calls()
    live = teacher.fit(_live(_method(name)), digits, recipe, **LOGIT_METHODS[name])
    _assert_same_run(cached, live)

    full, last = divmod(len(digits.train), batch_size)
    assert teacher.calls() == ([batch_size] * full + [last]) * 2  # live: every step
    # cached: each image once in a full-size batch, one batch checked against the cache, then only each short last batch
    assert calls_cached == [batch_size] * (full + 1) + [batch_size] + [last] * 2


@pytest.mark.parametrize("teacher_arch, batch_size", [("cnn", 64), ("mlp", 647)])
@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_under_the_cuda_settings_bf16_and_channels_last_too(name, teacher_arch, batch_size, digits):
    recipe = Recipe(epochs=2, batch_size=batch_size)
    teacher = Teacher(teacher_arch)
    cached = teacher.fit(_method(name), digits, recipe, CUDA_SETTINGS_ON_CPU)
    assert len(teacher.calls()) == -(-len(digits.train) // batch_size) + 1 + 2  # the cache was used
    _assert_same_run(cached, teacher.fit(_live(_method(name)), digits, recipe, CUDA_SETTINGS_ON_CPU))


def test_the_cache_serves_the_logit_methods_without_augmentation_only(digits):
    assert {name for name, cls in METHODS.items() if cacheable(cls, Recipe(), digits)} == \
        {"kd", "dkd", "dist", "ctkd", "adversarial"}
    assert not cacheable(KD, Recipe(augment="translate"), digits)
    assert not cacheable(KD, Recipe(augment="crop_flip"), digits)
    assert not cacheable(KD, Recipe(batch_size=len(digits.train) + 1), digits)  # no batch of the training size


@pytest.mark.parametrize("name", ["kd-translate", "fitnets", "mlkd"])
def test_an_augmented_recipe_or_a_feature_method_runs_the_teacher_every_step(name, digits):
    recipe = Recipe(epochs=2, batch_size=256, augment="translate" if name == "kd-translate" else None)
    teacher = Teacher()
    teacher.fit(_method(name), digits, recipe)
    full, last = divmod(len(digits.train), 256)
    steps = ([256] * full + [last]) * 2
    # mlkd's teacher sees each batch twice: the weak view and the strong one
    assert teacher.calls() == (steps if name != "mlkd" else [size for size in steps for _ in range(2)])


def test_a_resumed_fit_takes_the_cache_again_and_ends_as_the_teacher_run_every_step(digits, tmp_path):
    recipe = Recipe(epochs=3, batch_size=64)
    teacher = Teacher()
    full, resumed = uninterrupted_and_resumed(lambda: teacher.distiller(KD), digits, recipe, tmp_path, stop_after=2)
    _, live = teacher.fit(_live(KD), digits, recipe)
    for other in (resumed, live):
        assert_resumed_exactly(full, other, fields=("losses", "train_acc", "val_acc"))
        assert other.test_acc == full.test_acc


def test_logits_handed_to_a_fit_are_used_only_if_computed_along_its_path_and_matching_the_teacher(digits):
    recipe = Recipe(epochs=2, batch_size=64)
    teacher = Teacher()
    live = teacher.fit(_live(KD), digits, recipe)
    windows = -(-len(digits.train) // 64)

    def fit_given(logits):
        distiller = teacher.distiller(KD)
        teacher.calls()
        return distiller, fit(distiller, digits, recipe, execution=FLOAT32, teacher_logits=logits)

    given = compute_teacher_logits(teacher.model, digits, recipe, FLOAT32)
    _assert_same_run(fit_given(given), live)
    assert len(teacher.calls()) == 1 + 2  # the check, and each epoch's short last batch: nothing computed again

    other_path = compute_teacher_logits(teacher.model, digits, recipe.model_copy(update={"batch_size": 32}), FLOAT32)
    _assert_same_run(fit_given(other_path), live)
    assert len(teacher.calls()) == windows + 1 + 2  # computed again along this fit's path
    bf16 = compute_teacher_logits(teacher.model, digits, recipe, CUDA_SETTINGS_ON_CPU)
    _assert_same_run(fit_given(bf16), live)
    assert len(teacher.calls()) == windows + 1 + 2  # another precision and memory format: computed again too

    # one ulp off everywhere, as another machine's kernels could be: found on the first batch, and not used
    off = replace(given, logits=given.logits.nextafter(torch.tensor(float("inf"))))
    with pytest.warns(RuntimeWarning, match="cached teacher logits not used.*the teacher runs every step"):
        _assert_same_run(fit_given(off), live)


def _stored_teacher() -> StoredTeacher:
    return StoredTeacher(Teacher().model, "", "0" * 64, None, None, None, trained_now=False)


def _flip_a_byte(path) -> None:
    blob = bytearray(path.read_bytes())
    blob[-200] ^= 1
    path.write_bytes(bytes(blob))


DAMAGE = {
    "truncated": lambda pt, meta: pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2]),
    "a byte changed": lambda pt, meta: _flip_a_byte(pt),
    "sidecar unreadable": lambda pt, meta: meta.write_text("{not json"),
    "file gone": lambda pt, meta: pt.unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_stored_logits_are_reused_and_a_damaged_file_is_said_and_computed_again(damage, digits, tmp_path):
    cfg = parse_config({}, "default")
    teacher = _stored_teacher()
    said: list[str] = []
    first = stored_teacher_logits(teacher, cfg, digits, FLOAT32, tmp_path, said.append)
    (pt,) = (tmp_path / "logits").glob("*.pt")
    meta = pt.with_suffix(".json")
    written = pt.stat().st_mtime_ns
    again = stored_teacher_logits(teacher, cfg, digits, FLOAT32, tmp_path, said.append)
    assert torch.equal(again.logits, first.logits) and again.path == first.path
    assert pt.stat().st_mtime_ns == written and not said  # read back, not computed again

    DAMAGE[damage](pt, meta)
    rebuilt = stored_teacher_logits(teacher, cfg, digits, FLOAT32, tmp_path, said.append)
    assert torch.equal(rebuilt.logits, first.logits)
    assert len(said) == 1 and str(pt) in said[0] and said[0].endswith("computing them again"), said
    stored_teacher_logits(teacher, cfg, digits, FLOAT32, tmp_path, said.append)
    assert len(said) == 1  # the rebuilt file is intact


def test_logits_are_stored_per_path_and_teacher(digits, tmp_path):
    cfg = parse_config({}, "default")
    teacher = _stored_teacher()
    for c, t in [(cfg, teacher), (cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 32})}), teacher),
                 (cfg, replace(teacher, sha256="1" * 64))]:
        stored_teacher_logits(t, c, digits, FLOAT32, tmp_path, pytest.fail)
    assert len(list((tmp_path / "logits").glob("*.pt"))) == 3
    assert not [p for p in (tmp_path / "logits").iterdir() if p.suffix not in (".pt", ".json", ".lock")]
