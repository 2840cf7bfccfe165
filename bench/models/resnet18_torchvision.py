"""torchvision's ResNet-18 as one class, the way TorchServe's own example archives it
(examples/image_classifier/resnet_18/model.py): its stock handler loads a model file that defines
exactly one class. Random weights (bench/stock_image_classifier.py, --model resnet18-torchvision)."""

from torchvision.models.resnet import BasicBlock, ResNet


class ResNet18Torchvision(ResNet):
    def __init__(self):
        super().__init__(BasicBlock, [2, 2, 2, 2])
