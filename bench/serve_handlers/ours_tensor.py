"""Benchmark archive handler: ours, the tensor handler."""
from handlers import TensorHandler


class OursTensor(TensorHandler):
    pass
