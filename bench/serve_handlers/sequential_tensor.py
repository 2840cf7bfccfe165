"""Benchmark archive handler: the hand-written sequential loop (bench/baselines.py)."""
from baselines import SequentialTensorHandler


class SequentialTensor(SequentialTensorHandler):
    pass
