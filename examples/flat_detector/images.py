"""Greyscale test images for the flat detector, as the PNG bytes a client sends: a dark, noisy
background and a few bright cells, each of which the detector reports as one box."""

import io

import numpy as np
from PIL import Image

SIZE = 32  # pixels per side (the handler's default ``size``)
CELL = 4  # as model.CELL
GRID = SIZE // CELL
BACKGROUND = (0, 60)  # noise: far below the detector's threshold (0.5 · 255)
BRIGHT = (140, 255)  # a box's brightness: far above it


def detector_png(cells, rng: np.random.Generator, size: int = SIZE) -> bytes:
    """A ``size`` × ``size`` greyscale PNG with noise below the threshold and each ``(row, column,
    brightness)`` of ``cells`` a uniformly bright cell."""
    pixels = rng.integers(BACKGROUND[0], BACKGROUND[1] + 1, (size, size)).astype(np.uint8)
    for row, column, brightness in cells:
        pixels[row * CELL:(row + 1) * CELL, column * CELL:(column + 1) * CELL] = brightness
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def random_cells(rng: np.random.Generator, max_boxes: int = 5) -> list:
    """0 to ``max_boxes`` distinct cells (uniformly many), each with a random brightness."""
    count = int(rng.integers(0, max_boxes + 1))
    places = rng.choice(GRID * GRID, size=count, replace=False)
    return [(int(p) // GRID, int(p) % GRID, int(rng.integers(BRIGHT[0], BRIGHT[1] + 1))) for p in places]


def random_images(count: int, seed: int = 0, max_boxes: int = 5) -> list:
    """``count`` PNGs with 0 to ``max_boxes`` boxes each, the same for the same seed."""
    rng = np.random.default_rng(seed)
    return [detector_png(random_cells(rng, max_boxes), rng) for _ in range(count)]


# The archive's samples (samples/): exactly one box each, at different places and brightness.
SAMPLE_CELLS = {"one_box_top_left.png": (1, 1, 230), "one_box_centre.png": (4, 3, 160),
                "one_box_bottom_right.png": (7, 6, 255)}


def sample_pngs() -> dict:
    """``{file name: PNG bytes}`` of the samples, as committed in samples/."""
    rng = np.random.default_rng(7)
    return {name: detector_png([cell], rng) for name, cell in SAMPLE_CELLS.items()}
