"""Two-dimensional target distributions, each a sampler ``(n, generator) -> (x, y)``.

Every sampler returns points ``x`` of shape ``(n, 2)`` (float32, roughly unit scale, centred) and labels ``y`` of
shape ``(n,)`` (int64): the mixture component for :func:`class_mixture`, zeros for the unconditional sets. Samplers
draw only from the given ``torch.Generator``, so a seed fixes the data stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["DATASETS", "NUM_CLASSES", "checkerboard_precision", "sample"]


def _rand(n: int, g: torch.Generator | None, *shape: int) -> Tensor:
    return torch.rand(n, *shape, generator=g)


def _randn(n: int, g: torch.Generator | None, *shape: int) -> Tensor:
    return torch.randn(n, *shape, generator=g)


def _unlabelled(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.float(), torch.zeros(x.shape[0], dtype=torch.long)


def checkerboard(n: int, g: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Uniform on the 8 dark cells of a 4 x 4 board covering ``[-2, 2]^2``."""
    col = torch.randint(0, 4, (n,), generator=g)
    row = 2 * torch.randint(0, 2, (n,), generator=g) + (col % 2)  # dark cells: row + col even
    cell = torch.stack([col, row], dim=1).float()
    return _unlabelled(cell + _rand(n, g, 2) - 2.0)


def checkerboard_precision(x: Tensor) -> float:
    """Share of the points ``x (n, 2)`` that lie on the dark cells of :func:`checkerboard`.

    1 for the target; about 0.5 for a blur that fills the board evenly, lower when mass leaks off the board. A
    structural complement to the sliced W2, which a blurred board can score well on.
    """
    cell = torch.floor(x.double() + 2.0)
    on_board = ((cell >= 0) & (cell <= 3)).all(dim=1)
    dark = cell.sum(dim=1).remainder(2) == 0
    return float((on_board & dark).double().mean())


def eight_gaussians(n: int, g: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Eight Gaussians (std 0.1) evenly spaced on a circle of radius 1.5; label = component."""
    k = torch.randint(0, 8, (n,), generator=g)
    angle = k.float() * (2 * math.pi / 8)
    centres = 1.5 * torch.stack([angle.cos(), angle.sin()], dim=1)
    return (centres + 0.1 * _randn(n, g, 2)).float(), k


def two_moons(n: int, g: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Two interleaved half circles with small Gaussian jitter (std 0.05); label = moon."""
    k = torch.randint(0, 2, (n,), generator=g)
    a = math.pi * _rand(n, g)
    upper = torch.stack([a.cos(), a.sin()], dim=1)
    lower = torch.stack([1 - a.cos(), 0.5 - a.sin()], dim=1)
    x = torch.where(k[:, None] == 0, upper, lower) - torch.tensor([0.5, 0.25])
    return (1.2 * x + 0.05 * _randn(n, g, 2)).float(), k


def spirals(n: int, g: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Two interleaved Archimedean spirals with small jitter; label = arm."""
    k = torch.randint(0, 2, (n,), generator=g)
    s = _rand(n, g).sqrt()
    angle = 3 * math.pi * s + math.pi * k.float()
    x = 1.8 * s[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)
    return (x + 0.05 * _randn(n, g, 2)).float(), k


def swiss_roll(n: int, g: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The 2-D Swiss roll (the x-z plane of scikit-learn's), scaled to about ``[-2, 2]^2``."""
    s = 1.5 * math.pi * (1 + 2 * _rand(n, g))
    x = torch.stack([s * s.cos(), s * s.sin()], dim=1) / 7.0
    return _unlabelled(x + 0.04 * _randn(n, g, 2))


def class_mixture(n: int, g: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Class-conditional mixture for guidance: 4 classes, each a ring arc in one quadrant plus a blob.

    Class ``k`` puts half of its mass on a quarter arc of radius 1.6 and half on a Gaussian (std 0.15) at radius 0.7
    in the same quadrant, so the class-conditional target is multimodal and the unconditional one is a ring.
    """
    k = torch.randint(0, 4, (n,), generator=g)
    base = k.float() * (math.pi / 2) + math.pi / 4
    on_arc = _rand(n, g) < 0.5
    arc_angle = base + (math.pi / 2) * (_rand(n, g) - 0.5) * 0.9
    arc = 1.6 * torch.stack([arc_angle.cos(), arc_angle.sin()], dim=1) + 0.04 * _randn(n, g, 2)
    blob = 0.7 * torch.stack([base.cos(), base.sin()], dim=1) + 0.15 * _randn(n, g, 2)
    return torch.where(on_arc[:, None], arc, blob).float(), k


DATASETS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "checkerboard": checkerboard,
    "8gaussians": eight_gaussians,
    "moons": two_moons,
    "spirals": spirals,
    "swissroll": swiss_roll,
    "mixture": class_mixture,
}

#: Number of classes a conditional model needs for each dataset (labels in ``[0, NUM_CLASSES)``).
NUM_CLASSES: dict[str, int] = {
    "checkerboard": 1,
    "8gaussians": 8,
    "moons": 2,
    "spirals": 2,
    "swissroll": 1,
    "mixture": 4,
}


def sample(name: str, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw ``n`` points of the named dataset.

    Args:
        name: One of :data:`DATASETS`.
        n: Number of points.
        generator: Random source (CPU generator).

    Returns:
        ``(x, y)``: points ``(n, 2)`` float32 and labels ``(n,)`` int64.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not one of {sorted(DATASETS)}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    return DATASETS[name](n, generator)
