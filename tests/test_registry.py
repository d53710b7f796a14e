"""Objectives by name: meanflow_losses.registry."""

from __future__ import annotations

import pytest
import torch

import meanflow_losses as mfl
from tests.nets import MLP


@pytest.mark.parametrize(
    "name,cls",
    [
        ("flow_matching", mfl.FlowMatchingLoss),
        ("fm", mfl.FlowMatchingLoss),
        ("FlowMatchingLoss", mfl.FlowMatchingLoss),
        ("meanflow", mfl.MeanFlowLoss),
        ("MeanFlowLoss", mfl.MeanFlowLoss),
        ("alphaflow", mfl.AlphaFlowLoss),
        ("alpha_flow", mfl.AlphaFlowLoss),
        ("splitmeanflow", mfl.SplitMeanFlowLoss),
        ("split_meanflow", mfl.SplitMeanFlowLoss),
        ("shortcut", mfl.ShortcutLoss),
        ("ShortcutLoss", mfl.ShortcutLoss),
    ],
)
def test_names_and_aliases_resolve(name, cls):
    assert mfl.objective_class(name) is cls
    options = {"alpha": 0.5} if cls is mfl.AlphaFlowLoss else {}
    assert type(mfl.make_objective(name, **options)) is cls


def test_every_exported_objective_is_registered():
    exported = {mfl.FlowMatchingLoss, mfl.MeanFlowLoss, mfl.AlphaFlowLoss, mfl.SplitMeanFlowLoss, mfl.ShortcutLoss}
    assert set(mfl.OBJECTIVES.values()) == exported


def test_made_objective_equals_direct_construction_and_gives_the_same_loss():
    times = mfl.TimePairSampler("uniform", equal_fraction=0.5)
    made = mfl.make_objective("meanflow", times=times, jvp="finite_difference", reduction="mean")
    direct = mfl.MeanFlowLoss(times=times, jvp="finite_difference", reduction="mean")
    assert made == direct
    torch.manual_seed(0)
    net = MLP(dim=3).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    a = made(net, x, generator=torch.Generator().manual_seed(1))
    b = direct(net, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.per_sample, b.per_sample)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"objective 'meanflw' is unknown; known: alphaflow, flow_matching, meanflow"):
        mfl.make_objective("meanflw")
    with pytest.raises(TypeError, match="name must be a string"):
        mfl.objective_class(mfl.MeanFlowLoss)  # type: ignore[arg-type]


def test_unknown_option_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"MeanFlowLoss has no option 'equal_frac'; its options are times, "):
        mfl.make_objective("meanflow", equal_frac=0.5)
    with pytest.raises(ValueError, match=r"AlphaFlowLoss needs the option 'alpha'"):
        mfl.make_objective("alphaflow")
    # a bad value of a known option is still the objective's own error
    with pytest.raises(ValueError, match="jvp"):
        mfl.make_objective("meanflow", jvp="backward")
