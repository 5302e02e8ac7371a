"""acnorm_fused: fused Affine Collaborative Normalization (AC-Norm) for PyTorch.

AC-Norm replaces BatchNorm when finetuning a pretrained network: the
pretrained affine is kept frozen as the "source", a trainable "target" affine
is re-calibrated on every step with the source channels it correlates with.
"""

from ._version import __version__
from .backends import available_backends
from .convert import convert_model, fold_to_batchnorm
from .correlation import correlation, effective_affine
from .distributed import SyncACNorm
from .functional import ac_norm
from .modules import ACNorm1d, ACNorm2d, ACNorm3d, AffineCoNorm2d, AffineCoNorm3d
from .transferability import ac_corr, ac_corr_layers

__all__ = [
    "__version__",
    "ACNorm1d",
    "ACNorm2d",
    "ACNorm3d",
    "AffineCoNorm2d",
    "AffineCoNorm3d",
    "SyncACNorm",
    "ac_norm",
    "correlation",
    "effective_affine",
    "ac_corr",
    "ac_corr_layers",
    "convert_model",
    "fold_to_batchnorm",
    "available_backends",
]
