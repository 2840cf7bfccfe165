"""Benchmark archive handler: the stock-style sequential text embedder (bench/baselines.py)."""
from baselines import SequentialTextEmbedder


class SequentialText(SequentialTextEmbedder):
    pass
