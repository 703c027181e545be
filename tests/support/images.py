"""Test images made in memory."""

from __future__ import annotations

import numpy as np


def rng_image(width: int, height: int, mode: str = "RGB", seed: int = 0):
    """A random image in any PIL mode, built from smooth gradients plus noise."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     (x + y) * 127 / max(width + height - 2, 1), rng.randint(0, 256, (height, width))], -1)
    noisy = (base * 0.8 + rng.randint(0, 50, base.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(noisy, "RGBA").convert(mode)
