"""What every registered method promises the CLI, the sweep and the README, checked over the whole registry."""

from __future__ import annotations

import pytest

from kdarena.methods import METHODS, Distiller, MethodParams, PairInfo
from kdarena.methods.space import Choice, FloatRange, IntRange
from helpers import digits_model, digits_pair


def _digits_cnn_pair(num_train: int = 1000) -> PairInfo:
    """The default digits pair of the method tests (cnn channels 8 → 4), with a training split's size."""
    base = digits_pair(digits_model("cnn", 1, channels=4), digits_model("cnn", 0, channels=8))
    return PairInfo(base.student_stages, base.teacher_stages, base.num_classes, base.in_channels, base.input_size,
                    num_train=num_train)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_names_its_reference_in_one_line(name):
    cls = METHODS[name]
    assert issubclass(cls, Distiller) and cls.name == name
    assert isinstance(cls.reference, str) and cls.reference.strip(), f"{name} has no reference"
    assert "\n" not in cls.reference


@pytest.mark.parametrize("name", list(METHODS))
def test_defaults_validate_and_the_space_searches_only_params_fields(name):
    cls = METHODS[name]
    assert issubclass(cls.Params, MethodParams)
    defaults = cls.Params()
    assert cls.Params.model_validate(defaults.model_dump()) == defaults
    fields = set(cls.Params.model_fields)
    assert set(cls.space) <= fields, f"{name}: space names {set(cls.space) - fields} are not Params fields"
    for knob, dim in cls.space.items():
        # every value the sweep may draw is a valid parameter: both ends of a range, every choice
        values = dim.choices if isinstance(dim, Choice) else (dim.low, dim.high)
        assert isinstance(dim, (Choice, FloatRange, IntRange))
        if not isinstance(dim, Choice):
            assert dim.low < dim.high and (not dim.log or dim.low > 0)
        for value in values:
            cls.Params(**{knob: value})


@pytest.mark.parametrize("name", list(METHODS))
def test_check_pair_serves_the_default_digits_cnn_pair_or_says_why_in_one_line(name):
    cls = METHODS[name]
    why = cls.check_pair(cls.Params(), _digits_cnn_pair())
    assert why is None or (isinstance(why, str) and why.strip() and "\n" not in why), f"{name}: {why!r}"
    # and a pair it may refuse (an MLP student, no training-split size) is answered the same way, never raised
    mlp = digits_pair(digits_model("mlp", 0, hidden=[16]), digits_model("cnn", 0, channels=8))
    why = cls.check_pair(cls.Params(), mlp)
    assert why is None or (isinstance(why, str) and why.strip() and "\n" not in why), f"{name}: {why!r}"


def test_the_all_methods_sweep_lists_every_registered_method():
    from kdarena.search.sweep_config import load_sweep
    from kdarena.sweeps import preset_path

    sweep, _ = load_sweep(preset_path("all-methods"))
    assert list(sweep.methods) == list(METHODS), "add the new method to sweeps/all-methods.yaml"
    assert sweep.dataset.name == "digits" and len(sweep.students) == 1 and sweep.final.seeds == 0
