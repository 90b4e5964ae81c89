"""Token-for-token agreement of the `official` layout with the published implementation.

``tests/data/official_golden.json`` holds the token order that the published code
(xuyang-liu16/GlobalCom2, ``llava_arch.py``) produced on deterministic importance maps, recorded
once out of tree by feeding it features that encode their own index. Only its output is stored
here, as data.
"""

import json
from pathlib import Path

import pytest
import torch

from globalcom2.core import geometry, plans

GOLDEN = json.loads((Path(__file__).parent / "data" / "official_golden.json").read_text())


def _importance(views: int, n: int = 576) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    rows = [torch.sin(0.37 * i + 1.3 * v) + 0.25 * torch.cos(0.011 * i * (v + 1)) + 0.05 * v for v in range(views)]
    return torch.stack(rows).float()


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"{c['image_hw']}-R{c['retention_ratio']}")
def test_official_layout_matches_the_published_code(case):
    gh, gw = case["grid_hw"]
    geom = geometry.crop_geometry(tuple(case["image_hw"]), (gh, gw), 24)
    plan = plans.plan_image(_importance(1 + gh * gw), geom, case["retention_ratio"], layout="official")
    newline = (1 + gh * gw) * 576
    order = [-1 if i == newline else i for i in plan.index.tolist()]
    assert order == case["order"]
