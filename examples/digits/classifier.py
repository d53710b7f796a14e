"""A small CNN classifier of the real digits, its feature space, and the Frechet distance in that space.

The classifier is trained by the example on the training split only; the held-out split measures its accuracy
and serves as the reference set of the Frechet distance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DigitClassifier", "frechet_distance", "train_classifier"]


class DigitClassifier(nn.Module):
    """Conv(16) -> Conv(32) -> pool -> 128-d features -> 10 logits, for ``(B, 1, 8, 8)`` images in ``[-1, 1]``."""

    def __init__(self, num_classes: int = 10, feature_dim: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``(B, feature_dim)``."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)``."""
        return self.head(self.body(x))


def _shift(x: Tensor, g: torch.Generator) -> Tensor:
    # augmentation: random shifts of up to one pixel (pad with the background value -1)
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    i, j = torch.randint(0, 3, (2,), generator=g).tolist()
    return pad[:, :, i : i + 8, j : j + 8]


def train_classifier(
    x: Tensor, y: Tensor, steps: int = 800, batch: int = 128, lr: float = 2e-3, seed: int = 0
) -> DigitClassifier:
    """Train :class:`DigitClassifier` on ``x (N, 1, 8, 8)``, ``y (N,)`` with Adam and small random shifts."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = F.cross_entropy(clf(_shift(x[idx], g)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return clf.eval()


@torch.no_grad()
def accuracy(clf: DigitClassifier, x: Tensor, y: Tensor, num_classes: int = 10) -> tuple[float, list[float]]:
    """Overall accuracy and per-class accuracy (a list of ``num_classes`` floats) of ``clf`` on ``(x, y)``."""
    pred = clf(x).argmax(dim=1)
    ok = (pred == y).double()
    per_class = [float(ok[y == c].mean()) if bool((y == c).any()) else float("nan") for c in range(num_classes)]
    return float(ok.mean()), per_class


def _sqrt_psd(m: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


@torch.no_grad()
def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (as in FID), in float64.

    :math:`\\|\\mu_a - \\mu_b\\|^2
    + \\mathrm{tr}(\\Sigma_a + \\Sigma_b - 2(\\Sigma_a^{1/2}\\Sigma_b\\Sigma_a^{1/2})^{1/2})`.

    Args:
        a: Features ``(n_a, d)``.
        b: Features ``(n_b, d)``.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"a and b must be (n >= 2, d) with the same d, got {tuple(a.shape)}, {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    s = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(s @ cov_b @ s).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)
