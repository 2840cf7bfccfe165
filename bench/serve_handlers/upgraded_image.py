"""Benchmark archive handler: TorchServe's stock ImageClassifier, upgraded in one line (needs torchvision in the worker)."""
from ts.torch_handler.image_classifier import ImageClassifier

from handlers import upgrade

ImageClassifier = upgrade(ImageClassifier)
