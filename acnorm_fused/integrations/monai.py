"""AC-Norm in MONAI networks: ``register()`` adds ``"acnorm"`` to MONAI's ``Norm``
factory, so that any network built with MONAI's normalisation layers takes it
by name::

    from acnorm_fused.integrations import monai as acnorm_monai
    acnorm_monai.register()
    net = monai.networks.nets.UNet(3, 1, 2, (16, 32, 64), (2, 2), norm="acnorm")
    net = monai.networks.nets.DynUNet(..., norm_name=("acnorm", {"temperature": 0.5}))

MONAI passes the channel count as ``num_features``; the other arguments of
the tuple form go to :class:`acnorm_fused.ACNorm3d` (or 1d/2d for the
network's spatial dimensions). The layers start with identity affines, as a
freshly built BatchNorm does; load a pretrained BatchNorm checkpoint into
them to finetune (each layer fills its source and target affine from it).
"""

from __future__ import annotations

from ..modules import ACNorm, ACNorm1d, ACNorm2d, ACNorm3d

__all__ = ["NAME", "register"]

NAME = "acnorm"
_BY_SPATIAL_DIMS: dict[int, type[ACNorm]] = {1: ACNorm1d, 2: ACNorm2d, 3: ACNorm3d}


def _acnorm_type(dim: int) -> type[ACNorm]:
    """AC-Norm layers in 1, 2 or 3 spatial dimensions."""
    if dim not in _BY_SPATIAL_DIMS:
        raise ValueError(f"acnorm: MONAI asked for AC-Norm in {dim} spatial dimensions; 1, 2 and 3 exist")
    return _BY_SPATIAL_DIMS[dim]


def register() -> None:
    """Add ``"acnorm"`` to ``monai.networks.layers.factories.Norm``; calling it
    again changes nothing. Raises ImportError, saying what to install, without MONAI."""
    try:
        from monai.networks.layers.factories import Norm
    except ImportError as error:
        raise ImportError(
            "acnorm_fused.integrations.monai needs MONAI: pip install 'acnorm-fused[monai]'"
        ) from error
    if NAME.upper() not in Norm.components:
        Norm.add_factory_callable(NAME, _acnorm_type, "AC-Norm (acnorm_fused) layers in 1, 2 or 3 dimensions")
