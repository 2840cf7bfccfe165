"""A tiny "flat" detector: one (K, 7) tensor for the whole micro-batch, one row per box,
``[batch_index, x0, y0, x1, y1, score, label]``, sorted by batch index (the layout of
torchvision's ``batched_nms`` post-processing and of exported YOLO models). K depends on the
images, not on how many there are.

It marks every ``CELL`` × ``CELL`` cell of a greyscale image whose mean brightness is at least
``threshold`` as a box; the score is that mean, the label 1 ("white") from ``white`` up, else 0
("grey"). Torch ops only, deterministic, no training: its answer on any image can be worked out
by hand.
"""

import torch
from torch import nn

CELL = 4  # pixels per side of a cell: a 32×32 image is an 8×8 grid of possible boxes
COLUMNS = 7  # batch_index, x0, y0, x1, y1, score, label


class FlatDetector(nn.Module):
    def __init__(self):
        super().__init__()
        # Buffers, so that the archive's state_dict carries them (build.py sets them).
        self.register_buffer("threshold", torch.tensor(0.5))
        self.register_buffer("white", torch.tensor(0.75))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: (N, 1, H, W) floats in [0, 1] → (K, 7) float32, rows ordered by batch index,
        then top to bottom, left to right."""
        cells = nn.functional.avg_pool2d(images, CELL)[:, 0]  # (N, H / CELL, W / CELL) mean brightness
        found = torch.nonzero(cells >= self.threshold)  # (K, 3): n, row, column; row-major, so by n first
        n, row, column = found.unbind(1)
        score = cells[n, row, column]
        x0, y0 = column * CELL, row * CELL
        label = (score >= self.white).to(score.dtype)
        return torch.stack([n.to(score.dtype), x0.to(score.dtype), y0.to(score.dtype), (x0 + CELL).to(score.dtype),
                            (y0 + CELL).to(score.dtype), score, label], dim=1)
