"""Benchmark archive handler: the stock-style sequential image classifier (bench/baselines.py)."""
from baselines import SequentialImageClassifier


class SequentialImage(SequentialImageClassifier):
    pass
