"""Objectives selectable by name, so that a config file or a command line can pick any of them.

    import meanflow_losses as mfl

    loss = mfl.make_objective("meanflow", jvp="finite_difference")   # == mfl.MeanFlowLoss(jvp="finite_difference")
    mfl.make_objective("meanflow", equal_frac=0.5)   # ValueError naming the option and listing the valid ones
    mfl.OBJECTIVES                                   # {"flow_matching": FlowMatchingLoss, "meanflow": ..., ...}
    mfl.make_objective("meanflow", recipe="small_data")   # a named recipe (mfl.presets.RECIPES) sets the times,
                                                          # weighting and reduction; options given override it

Names are lower case; ``"fm"``, ``"alpha_flow"``, ``"split_meanflow"`` and the class names themselves are accepted
as aliases. Options are the objective's dataclass fields; an unknown option raises an error that lists the valid
ones instead of being ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from meanflow_losses.objectives import (
    AlphaFlowLoss,
    FlowMatchingLoss,
    MeanFlowLoss,
    ShortcutLoss,
    SplitMeanFlowLoss,
)

__all__ = ["OBJECTIVES", "RECIPE_NAMES", "make_objective", "objective_class"]

#: Canonical name -> objective class.
OBJECTIVES: dict[str, type] = {
    "flow_matching": FlowMatchingLoss,
    "meanflow": MeanFlowLoss,
    "alphaflow": AlphaFlowLoss,
    "splitmeanflow": SplitMeanFlowLoss,
    "shortcut": ShortcutLoss,
}

#: Names of the recipes :func:`make_objective` accepts (:data:`meanflow_losses.presets.RECIPES`).
#: Pinned to presets.RECIPES by tests/test_official_samplers.py.
RECIPE_NAMES: tuple[str, ...] = ("imagenet", "small_data")

_ALIASES: dict[str, str] = {
    "fm": "flow_matching",
    "alpha_flow": "alphaflow",
    "split_meanflow": "splitmeanflow",
    **{cls.__name__: name for name, cls in OBJECTIVES.items()},
}


def objective_class(name: str) -> type:
    """The objective class called ``name`` (a canonical name, an alias or the class name).

    Raises:
        ValueError: ``name`` is unknown; the message lists the known names.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    key = _ALIASES.get(name, name)
    if key not in OBJECTIVES:
        raise ValueError(
            f"objective {name!r} is unknown; known: {', '.join(sorted(OBJECTIVES))} "
            f"(aliases: {', '.join(sorted(_ALIASES))})"
        )
    return OBJECTIVES[key]


def make_objective(name: str, *, recipe: str | None = None, **options: Any) -> Any:
    """Build the objective called ``name`` with ``options`` (its dataclass fields).

    Args:
        name: A key of :data:`OBJECTIVES` or an alias.
        recipe: Optional named recipe (``"imagenet"``, ``"small_data"``; :data:`meanflow_losses.presets.RECIPES`)
            that sets ``times``, ``weighting`` and ``reduction`` (and alpha-Flow's ``target_clip``); ``options``
            given explicitly override it. ``None`` (default): the objective's own defaults.
        **options: Fields of the objective, e.g. ``times=TimePairSampler(...)``, ``jvp="nograd"``.

    Returns:
        The objective instance.

    Raises:
        ValueError: Unknown name, an unknown recipe, an option that is not a field of the objective (the message
            lists the valid fields), or a required option left out (``alpha`` of alpha-Flow).
    """
    cls = objective_class(name)
    if recipe is not None:
        from meanflow_losses.presets import recipe_options

        options = {**recipe_options(recipe, cls), **options}
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(
            f"{cls.__name__} has no option {', '.join(map(repr, unknown))}; its options are {', '.join(fields)}"
        )
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in options
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{cls.__name__} needs the option {', '.join(map(repr, missing))}")
    return cls(**options)
