"""Accuracy measures used by the conversion checks."""

from __future__ import annotations

import numpy as np

__all__ = ["cosine", "max_abs", "per_row_cosine_min"]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of the two arrays flattened (float64)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    if denom == 0.0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(np.dot(a, b) / denom)


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute elementwise difference."""
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def per_row_cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    """The worst cosine over the leading axis (one value per tile)."""
    return min(cosine(x, y) for x, y in zip(a, b))
