import json
import math
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest
import torch

from globalcom2 import GlobalCom2Config
from globalcom2.methods import FasterVLMConfig, PoolingConfig, RandomConfig
from globalcom2.methods import FastVConfig
from globalcom2.methods import VISION_METHODS, make_config


def test_defaults_match_the_paper():
    c = GlobalCom2Config()
    assert (c.retention_ratio, c.layout, c.temperature) == (0.25, "official", 10.0)


def test_round_trip_through_json():
    c = GlobalCom2Config(retention_ratio=0.1, layout="spatial", temperature=5)
    again = GlobalCom2Config.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c
    assert isinstance(again.temperature, float)


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.0001, 2, math.nan, math.inf, "0.5", True, None])
def test_bad_retention_ratio_names_the_field(value):
    with pytest.raises(ValueError, match="retention_ratio"):
        GlobalCom2Config(retention_ratio=value)


@pytest.mark.parametrize("value", ["Official", "raster", "", None])
def test_bad_layout_names_the_field(value):
    with pytest.raises(ValueError, match="layout"):
        GlobalCom2Config(layout=value)


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, "10"])
def test_bad_temperature_names_the_field(value):
    with pytest.raises(ValueError, match="temperature"):
        GlobalCom2Config(temperature=value)


def test_ratio_one_is_allowed():
    assert GlobalCom2Config(retention_ratio=1).retention_ratio == 1.0


def test_unknown_fields_are_rejected_by_name():
    with pytest.raises(ValueError, match="ratio"):
        GlobalCom2Config.from_dict({"ratio": 0.5})
    with pytest.raises(ValueError, match="tau"):
        GlobalCom2Config().replace(tau=3)


def test_replace_validates():
    c = GlobalCom2Config().replace(layout="spatial")
    assert c.layout == "spatial"
    with pytest.raises(ValueError, match="retention_ratio"):
        c.replace(retention_ratio=0)


# -- numeric options: NumPy / torch scalars, None, bools, arrays (every field of every config) -------

CONFIG_CLASSES = sorted(
    {GlobalCom2Config, FasterVLMConfig, RandomConfig, PoolingConfig, FastVConfig, *VISION_METHODS.values()},
    key=lambda c: c.__name__,
)
_KINDS = {"float": float, "int": int, "str": str, "Layout": str, "Count": str}


def _kind(field) -> type:
    name = field.type if isinstance(field.type, str) else field.type.__name__
    return _KINDS[name]


ALL_FIELDS = [pytest.param(cls, f.name, id=f"{cls.__name__}.{f.name}") for cls in CONFIG_CLASSES for f in fields(cls)]
NUMERIC = [
    pytest.param(cls, f.name, _kind(f), f.default, id=f"{cls.__name__}.{f.name}")
    for cls in CONFIG_CLASSES
    for f in fields(cls)
    if _kind(f) in (float, int)
]


def test_every_field_has_a_known_kind_and_the_numeric_ones_are_found():
    # A field of a new type fails here, so that the tests below are extended for it.
    for cls in CONFIG_CLASSES:
        for f in fields(cls):
            assert (f.type if isinstance(f.type, str) else f.type.__name__) in _KINDS, (cls.__name__, f.name)
    found = {(p.values[0].__name__, p.values[1]) for p in NUMERIC}
    assert {("GlobalCom2Config", "temperature"), ("RandomConfig", "seed"), ("FastVConfig", "layer")} <= found
    assert {(c.__name__, "retention_ratio") for c in CONFIG_CLASSES} <= found


def _scalars(kind: type, value):
    """``value`` as every NumPy / torch scalar type that should be accepted for a ``kind`` field."""
    if kind is float:
        return [np.float64(value), np.float32(value), np.array(value), torch.tensor(value),
                torch.tensor(value, dtype=torch.float64)]
    return [np.int64(value), np.int32(value), np.uint8(value), np.array(value), torch.tensor(value),
            torch.tensor(value, dtype=torch.int32)]


@pytest.mark.parametrize("cls, name, kind, default", NUMERIC)
def test_numpy_and_torch_scalars_are_accepted_and_stored_as_python_numbers(cls, name, kind, default):
    plain = cls(**{name: default})
    for scalar in _scalars(kind, default):
        c = cls(**{name: scalar})
        stored = getattr(c, name)
        assert type(stored) is kind and stored == default, (scalar, stored)
        assert c == plain
        assert json.loads(json.dumps(c.to_dict())) == plain.to_dict()
        assert c.replace(**{name: scalar}) == plain


@pytest.mark.parametrize("cls, name, kind, default", [p for p in NUMERIC if p.values[2] is float])
def test_integer_scalars_are_accepted_for_real_fields(cls, name, kind, default):
    try:
        expected = cls(**{name: 1.0})
    except ValueError:
        pytest.skip(f"1 is not a valid {name}")
    for one in (1, np.int64(1), torch.tensor(1)):
        c = cls(**{name: one})
        assert type(getattr(c, name)) is float and c == expected


@pytest.mark.parametrize(
    "value, expected",
    [(np.float32(0.1), 0.1), (torch.tensor(0.1), 0.1), (np.float16(0.3), 0.3),
     (torch.tensor(0.3, dtype=torch.bfloat16), 0.3), (np.float32(0.3333), 0.3333), (np.float64(0.1), 0.1)],
)
def test_low_precision_floats_are_stored_as_their_shortest_decimal(value, expected):
    c = GlobalCom2Config(retention_ratio=value)
    assert c.retention_ratio == expected and c == GlobalCom2Config(retention_ratio=expected)


def _bad_numbers(kind: type, value):
    """(bad value, text the message must contain) for a ``kind`` field whose valid value is ``value``."""
    bad = [
        (True, "True (bool)"), (False, "False (bool)"), (np.True_, "numpy.bool"),
        (torch.tensor(True), "dtype torch.bool"),
        (str(value), f"{str(value)!r} (str)"), (b"1", "(bytes)"), ([value], "(list)"),
        (np.array([value, value]), "shape (2,)"), (np.array([value]), "shape (1,)"),
        (torch.tensor([value]), "shape (1,)"), (torch.tensor([[value]]), "shape (1, 1)"),
        (complex(value, 1), "(complex)"),
    ]
    if kind is float:
        bad += [(math.nan, "nan (float)"), (math.inf, "inf (float)"), (-math.inf, "-inf (float)"),
                (np.float32("nan"), "numpy.float32"), (torch.tensor(math.inf), "dtype torch.float32")]
    else:
        bad += [(float(value), f"{float(value)!r} (float)"), (value + 0.5, "(float)"),
                (np.float64(value), "numpy.float64"), (torch.tensor(float(value)), "dtype torch.float32"),
                (math.nan, "nan (float)")]
    return bad


@pytest.mark.parametrize("cls, name, kind, default", NUMERIC)
def test_bad_numbers_are_rejected_naming_the_field_and_the_type(cls, name, kind, default):
    for value, shown in _bad_numbers(kind, default):
        with pytest.raises(ValueError) as err:
            cls(**{name: value})
        message = str(err.value)
        assert message.startswith(f"{name} must be"), (value, message)
        assert shown in message, (value, message)
        with pytest.raises(ValueError, match=f"^{name} must be"):
            cls().replace(**{name: value})


@pytest.mark.parametrize("cls, name, kind, default", [p for p in NUMERIC if p.values[2] is int])
def test_integral_floats_are_rejected_for_integer_fields_with_a_hint(cls, name, kind, default):
    with pytest.raises(ValueError, match=f"{name} must be an integer, got {float(default)!r} \\(float\\); integral floats"):
        cls(**{name: float(default)})


def test_range_errors_show_the_number_read():
    with pytest.raises(ValueError, match=r"^retention_ratio must be in \(0, 1\], got 1\.5$"):
        GlobalCom2Config(retention_ratio=np.float32(1.5))
    with pytest.raises(ValueError, match=r"^layer must be >= 1, got 0$"):
        FastVConfig(layer=np.int64(0))
    with pytest.raises(ValueError, match=r"^seed must be >= 0, got -1$"):
        RandomConfig(seed=torch.tensor(-1))
    with pytest.raises(ValueError, match=r"^temperature must be a finite number > 0, got 0\.0$"):
        GlobalCom2Config(temperature=np.float64(0))


def test_make_config_passes_numpy_and_torch_scalars_through():
    # The path of globalcom2.apply(model, retention_ratio=np.float32(0.25), ...).
    assert make_config("globalcom2", retention_ratio=np.float32(0.25), temperature=torch.tensor(5.0)) == \
        GlobalCom2Config(retention_ratio=0.25, temperature=5.0)
    assert make_config("random", retention_ratio=torch.tensor(0.5), seed=np.int64(7)) == RandomConfig(0.5, seed=7)
    composed = make_config("globalcom2+fastv", retention_ratio=np.float64(0.5), fastv_layer=np.int64(3),
                           fastv_retention_ratio=torch.tensor(0.25))
    assert composed.fastv == FastVConfig(retention_ratio=0.25, layer=3)
    json.dumps(composed.to_dict())


# -- None is never "the default" -----------------------------------------------------------------


@pytest.mark.parametrize("cls, name", ALL_FIELDS)
def test_none_is_rejected_for_every_field_by_name(cls, name):
    default = next(f.default for f in fields(cls) if f.name == name)
    with pytest.raises(ValueError, match=f"^{name} must not be None; leave it out to use its default \\({default!r}\\)"):
        cls(**{name: None})
    with pytest.raises(ValueError, match=f"^{name} must not be None"):
        cls().replace(**{name: None})
    with pytest.raises(ValueError, match=f"^{name} must not be None"):
        cls.from_dict({name: None})


def test_none_retention_ratio_names_the_field():
    with pytest.raises(ValueError, match="retention_ratio must not be None"):
        GlobalCom2Config(retention_ratio=None)


def test_make_config_does_not_treat_none_as_the_default():
    with pytest.raises(ValueError, match="retention_ratio must not be None"):
        make_config("globalcom2", retention_ratio=None)


def test_choice_fields_reject_non_strings_with_their_type():
    with pytest.raises(ValueError, match=r"^layout must be one of 'official', 'spatial', got 1 \(int\)$"):
        GlobalCom2Config(layout=1)
    with pytest.raises(ValueError, match=r"got 'raster'$"):
        GlobalCom2Config(layout="raster")
    assert type(GlobalCom2Config(layout=np.str_("spatial")).layout) is str


def test_import_does_not_load_torch_or_numpy():
    code = "import sys, globalcom2, globalcom2.methods; print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
