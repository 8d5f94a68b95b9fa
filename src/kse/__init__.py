"""kse: compress convolutional networks with KSE (Li et al., "Exploiting Kernel Sparsity and
Entropy for Interpretable CNN Compression", CVPR 2019).

    >>> import kse
    >>> from kse.models import get_model
    >>> net = get_model("resnet56", num_classes=10)
    >>> kse.compress_(net, kse.KSEConfig(G=4))   # in place
    >>> kse.profile(net, (3, 32, 32)).macs       # paper's accounting
"""

__version__ = "0.1.0"

from .compress import LayerPlan, compress, compress_, plan
from .config import KSEConfig
from .conv import KSEConv2d
from .indicator import (centroid_counts, kernel_entropy, kernel_sparsity, kse_indicator,
                        official_layout_entropy)
from . import filter_prune, forms, fused, models  # modules of the API (kse.models.get_model, kse.fused.available() ...)
from .deploy import deploy_
from .fold import fold_batchnorm
from .kmeans import batched_kmeans, cluster_kernels
from .profile import Profile, profile
from .recalibrate import recalibrate_bn_
from .serialization import CheckpointError, load, save

__all__ = [
    "CheckpointError", "KSEConfig", "KSEConv2d", "LayerPlan", "Profile", "batched_kmeans", "centroid_counts", "cluster_kernels",
    "compress", "compress_", "deploy_", "filter_prune", "fold_batchnorm", "forms", "fused", "kernel_entropy", "kernel_sparsity", "kse_indicator",
    "load", "models", "official_layout_entropy", "plan", "profile", "recalibrate_bn_", "save",
]
