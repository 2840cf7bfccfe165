# A TorchServe handler file: TorchServe's stock ImageClassifier, upgraded in one line (docs/from_torchserve.md).
from ts.torch_handler.image_classifier import ImageClassifier

from handlers import upgrade

ImageClassifier = upgrade(ImageClassifier)
