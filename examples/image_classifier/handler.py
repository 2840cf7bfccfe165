"""The image classifier example: the ready-made handler as is (settings in the archiver config)."""

from handlers import ImageClassifierHandler


class ResNetHandler(ImageClassifierHandler):
    """ResNet-18 over 224×224 crops with ImageNet normalisation (the defaults)."""
