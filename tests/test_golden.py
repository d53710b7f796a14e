"""Every official setting's loss, per-sample losses and gradient stay what they were (float64, fixed draws)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.golden.cases import CASES, PATH, evaluate

GOLDEN = json.loads(PATH.read_text())


def test_every_case_is_pinned():
    assert sorted(GOLDEN) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_official_setting_is_unchanged(name):
    got, want = evaluate(name), GOLDEN[name]
    assert set(got) == set(want)
    for key in want:
        a = torch.tensor(got[key] if key != "decomposition" else list(got[key].values()), dtype=torch.float64)
        b = torch.tensor(want[key] if key != "decomposition" else list(want[key].values()), dtype=torch.float64)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=f"{name}: {key} changed")
