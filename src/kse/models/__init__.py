"""Model registry: CIFAR ResNets, DenseNet-40 and every torchvision classifier."""

from . import cifar_resnet, densenet_cifar  # noqa: F401  (registers the models)
from .registry import get_model, list_models, register_model

__all__ = ["get_model", "list_models", "register_model"]
