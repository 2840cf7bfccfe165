"""The handwritten digits that scikit-learn ships (8×8, values 0-16), as the PNG images a client
would send, with a fixed train/held-out split."""

import io

import numpy as np
from PIL import Image

HELD_OUT_SHARE = 0.2
SEED = 0


def digit_png(pixels_8x8: np.ndarray) -> bytes:
    """One digit as an 8×8 greyscale PNG (ink is white on black, as in the data set)."""
    grey = np.clip(np.asarray(pixels_8x8, dtype=np.float64) * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey.reshape(8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


def split():
    """``(train_images, train_labels, held_out_images, held_out_labels)``; images are (N, 8, 8)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(SEED).permutation(len(digits.target))
    cut = int(len(order) * (1 - HELD_OUT_SHARE))
    train, held_out = order[:cut], order[cut:]
    return digits.images[train], digits.target[train], digits.images[held_out], digits.target[held_out]
