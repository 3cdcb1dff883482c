"""Knee detectors of a descending curve, for CLS-inflection (``DETECTORS``).

Each entry takes the curve normalised to the unit square (``x_i = i / (n − 1)``, ``y`` from 1 down
to 0, ``n >= 3``, float64) and returns how many head values to keep, up to and including the
knee (``n``: no knee). :func:`runtime.prellm.knee_index` validates and normalises the curve, then
calls the named detector. Each is a few lines, so they share this module.

Example:
    >>> import torch
    >>> x = torch.linspace(0, 1, 5, dtype=torch.float64)
    >>> DETECTORS["kneedle"](x, torch.tensor([1.0, 0.2, 0.15, 0.1, 0.0], dtype=torch.float64))
    2
"""
from __future__ import annotations

import torch

from ..registry import Registry

DETECTORS = Registry("inflection detector")


@DETECTORS.register("kneedle")
def kneedle(x: torch.Tensor, y: torch.Tensor) -> int:
    """The point at the largest perpendicular distance from the chord joining the first and last points."""
    # Chord from (0, 1) to (1, 0): x + y = 1; distance |1 − x − y| / √2 (the √2 does not matter).
    distance = (1.0 - x - y).abs()
    best = float(distance.max())
    if best <= 1e-12:
        return y.shape[0]
    knee = int(torch.nonzero(distance >= best - 1e-12)[0])
    return knee + 1


@DETECTORS.register("max-curvature")
def max_curvature(x: torch.Tensor, y: torch.Tensor) -> int:
    """The interior point of largest signed curvature ``y'' / (1 + y'²)^{3/2}`` (central differences)."""
    n = y.shape[0]
    second = y[2:] - 2.0 * y[1:-1] + y[:-2]
    if float(second.max()) <= 1e-12:  # straight or concave: no convex bend
        return n
    dx = 1.0 / (n - 1)
    slope = (y[2:] - y[:-2]) / (2.0 * dx)
    curvature = (second / dx**2) / (1.0 + slope**2) ** 1.5
    best = float(curvature.max())
    return int(torch.nonzero(curvature >= best - 1e-12 * abs(best))[0]) + 2  # interior index + 1, +1 for the count
