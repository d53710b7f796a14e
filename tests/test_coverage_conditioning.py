"""Conditioning: the per-row decision, its reuse, and the checks on a replaced (null) condition."""

from __future__ import annotations

import pytest
import torch

import meanflow_losses as mfl
from meanflow_losses.conditioning import Conditioning, _items, _same


class _Uncomparable:
    """An object whose ``==`` raises (as a NumPy array's truth value does)."""

    def __eq__(self, other):
        raise RuntimeError("no comparison")

    __hash__ = object.__hash__


def test_items_of_a_non_container_is_empty():
    assert _items(3) == []
    assert _items("ab") == []
    assert _items((5, 6)) == [(0, 5), (1, 6)]


def test_from_kwargs_accepts_a_conditioning_of_the_same_rows_only():
    cond = Conditioning.from_kwargs({"y": torch.arange(4)}, 4)
    assert Conditioning.from_kwargs(cond, 4) is cond
    with pytest.raises(ValueError, match=r"conditioning has 4 rows, expected 3"):
        Conditioning.from_kwargs(cond, 3)


def test_mapping_interface_unwraps_shared_markers():
    pos = torch.arange(3.0)
    cond = Conditioning.from_kwargs({"pos": mfl.shared(pos), "extra": {"emb": mfl.shared(pos)}, "s": 2}, 3)
    assert cond.per_row == frozenset()
    assert len(cond) == 3
    assert sorted(cond) == ["extra", "pos", "s"]
    assert cond["pos"] is pos  # the tensor itself, not the marker
    assert cond["extra"]["emb"] is pos
    assert cond["s"] == 2
    kw = cond.call_kwargs()
    assert kw["pos"] is pos and kw["extra"]["emb"] is pos  # nested markers removed too


def test_nested_per_row_entries_are_selected_repeated_and_concatenated():
    y = torch.tensor([10, 11, 12])
    cond = Conditioning.from_kwargs({"added": {"emb": y, "scale": 0.5}, "seq": [y, "name"]}, 3)
    assert cond.per_row == frozenset({("added", "emb"), ("seq", 0)})
    sel = cond.select(torch.tensor([2, 0]))
    assert sel.rows == 2
    assert sel["added"]["emb"].tolist() == [12, 10] and sel["added"]["scale"] == 0.5
    assert sel["seq"][0].tolist() == [12, 10] and sel["seq"][1] == "name"
    rep = cond.repeat(2)
    assert rep.rows == 6 and rep["added"]["emb"].tolist() == [10, 11, 12, 10, 11, 12]
    both = sel.concat(cond)
    assert both.rows == 5 and both["seq"][0].tolist() == [12, 10, 10, 11, 12]


def test_concat_and_where_refuse_conditionings_with_other_per_row_entries():
    a = Conditioning.from_kwargs({"y": torch.arange(2)}, 2)
    b = Conditioning.from_kwargs({"y": 3}, 2)
    with pytest.raises(ValueError, match=r"Conditioning\.concat: the two conditionings have different per-row"):
        a.concat(b)
    with pytest.raises(ValueError, match=r"Conditioning\.where: the two conditionings have different per-row"):
        a.where(torch.tensor([True, False]), b)


def test_replace_refuses_a_non_mapping():
    cond = Conditioning.from_kwargs({"y": torch.arange(2)}, 2)
    with pytest.raises(TypeError, match=r"nullc must return a dict of model keyword arguments, got list"):
        cond.replace([1, 2], "nullc")


def test_replace_refuses_other_keys_naming_both_sets():
    cond = Conditioning.from_kwargs({"y": torch.arange(2), "s": 1}, 2)
    with pytest.raises(
        ValueError, match=r"nullc must return the same keys as model_kwargs, got \['y'\] vs \['s', 'y'\]"
    ):
        cond.replace({"y": torch.zeros(2, dtype=torch.long)}, "nullc")


def test_replace_refuses_a_nested_dict_turned_into_another_type():
    cond = Conditioning.from_kwargs({"added": {"emb": torch.zeros(2, 3)}}, 2)
    with pytest.raises(ValueError, match=r"must return the same keys as model_kwargs\['added'\], got int vs \['emb'\]"):
        cond.replace({"added": 5}, "nullc")


def test_replace_refuses_a_sequence_of_another_length():
    cond = Conditioning.from_kwargs({"seq": [torch.zeros(2), "a"]}, 2)
    with pytest.raises(ValueError, match=r"must keep model_kwargs\['seq'\] a sequence of length 2, got list"):
        cond.replace({"seq": [torch.zeros(2)]}, "nullc")


def test_replace_refuses_a_per_row_entry_of_another_shape():
    cond = Conditioning.from_kwargs({"y": torch.zeros(2, 3)}, 2)
    with pytest.raises(ValueError, match=r"per-row entry model_kwargs\['y'\] \(2, 3\), got \(2, 4\)"):
        cond.replace({"y": torch.zeros(2, 4)}, "nullc")
    with pytest.raises(ValueError, match=r"per-row entry model_kwargs\['y'\] \(2, 3\), got str"):
        cond.replace({"y": "null"}, "nullc")


def test_replace_checks_nested_entries_and_keeps_the_decision():
    emb = torch.ones(2, 3)
    cond = Conditioning.from_kwargs({"added": {"emb": emb, "k": 4}, "seq": (emb, 1.0)}, 2)
    null = cond.replace({"added": {"emb": torch.zeros(2, 3), "k": 4}, "seq": (torch.zeros(2, 3), 1.0)}, "nullc")
    assert null.per_row == cond.per_row
    mixed = cond.where(torch.tensor([True, False]), null)
    assert mixed["added"]["emb"].tolist() == [[0.0] * 3, [1.0] * 3]
    assert isinstance(mixed["seq"], tuple) and mixed["seq"][0].tolist() == [[0.0] * 3, [1.0] * 3]
    with pytest.raises(ValueError, match=r"nullc changed model_kwargs\['added'\]\['k'\], which is shared by every"):
        cond.replace({"added": {"emb": emb, "k": 5}, "seq": (emb, 1.0)}, "nullc")


def test_replace_compares_shared_entries_by_value():
    pos = torch.arange(2.0)
    cond = Conditioning.from_kwargs(
        {"y": torch.arange(2), "pos": mfl.shared(pos), "opts": {"a": 1, "b": [1, 2]}, "seq": [1, 2]}, 2
    )
    new = {"y": torch.zeros(2, dtype=torch.long), "pos": mfl.shared(pos.clone()), "opts": {"a": 1, "b": [1, 2]}}
    assert cond.replace({**new, "seq": (1, 2)}, "nullc").kwargs["seq"] == (1, 2)  # a list and a tuple agree
    with pytest.raises(ValueError, match=r"nullc changed model_kwargs\['pos'\]"):
        cond.replace({**new, "pos": mfl.shared(pos + 1), "seq": [1, 2]}, "nullc")
    with pytest.raises(ValueError, match=r"nullc changed model_kwargs\['opts'\]"):
        cond.replace({**new, "opts": {"a": 1}, "seq": [1, 2]}, "nullc")
    with pytest.raises(ValueError, match=r"nullc changed model_kwargs\['seq'\]"):
        cond.replace({**new, "seq": [1, 2, 3]}, "nullc")


def test_same_is_false_when_comparison_raises_or_types_differ():
    obj = _Uncomparable()
    assert _same(obj, obj)  # identity first
    assert not _same(obj, _Uncomparable())
    assert not _same(torch.zeros(2), [0.0, 0.0])
    assert not _same(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert _same({"a": (1, torch.ones(1))}, {"a": [1, torch.ones(1)]})
    assert not _same({"a": 1}, {"b": 1})
