"""A trivial model (4 features → 3 scores): all that is left to measure is the framework."""

import torch
from torch import nn


class TinyLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
