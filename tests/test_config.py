import json
import math

import pytest

from globalcom2 import GlobalCom2Config


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
