"""Small models and checks shared by the tests."""

import torch

import kse
from kse.models import get_model


def tiny_kse(G: int = 4) -> torch.nn.Module:
    """A KSE-compressed one-channel ResNet-20 for 16x16 inputs, in eval mode (quick to build)."""
    return kse.compress(get_model("resnet20", num_classes=10, in_channels=1).eval(),
                        kse.KSEConfig(G=G, input_size=(1, 16, 16)))


def assert_same_function(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal within ``rel`` of the reference's largest magnitude (float32 reassociation)."""
    torch.testing.assert_close(got, ref, rtol=rel, atol=rel * ref.abs().max().item())
