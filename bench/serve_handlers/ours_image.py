"""Benchmark archive handler: ours, the ready-made image classifier."""
from handlers import ImageClassifierHandler


class OursImage(ImageClassifierHandler):
    pass
