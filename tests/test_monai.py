"""MONAI networks built with ``norm="acnorm"`` (skipped when MONAI is not installed)."""

from __future__ import annotations

import pytest
import torch

import acnorm_fused as acn
from acnorm_fused.integrations import monai as acnorm_monai

nets = pytest.importorskip("monai.networks.nets")


@pytest.fixture(scope="module", autouse=True)
def _registered():
    acnorm_monai.register()
    acnorm_monai.register()  # idempotent


NETWORKS = {
    "UNet": lambda norm: nets.UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), norm=norm),
    "BasicUNet": lambda norm: nets.BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4), norm=norm),
    "SegResNet": lambda norm: nets.SegResNet(3, init_filters=4, in_channels=1, out_channels=2, norm=norm),
    "DynUNet": lambda norm: nets.DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                                        upsample_kernel_size=[2, 2], norm_name=norm),
}


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("norm", ["acnorm", ("acnorm", {"temperature": 0.5})], ids=["name", "with-args"])
def test_network_builds_and_trains_a_step(name, norm):
    torch.manual_seed(0)
    net = NETWORKS[name](norm)
    layers = [m for m in net.modules() if isinstance(m, acn.ACNorm3d)]
    assert layers, f"{name} has no AC-Norm layer"
    assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in net.modules())
    if isinstance(norm, tuple):
        assert all(layer.temperature == 0.5 for layer in layers)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01)
    before = layers[0].weight_target.detach().clone()
    source = layers[0].weight.detach().clone()
    x = torch.randn(2, 1, 16, 16, 16)
    out = net(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    loss = out.square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(layers[0].weight_target, before), "the target affine trains"
    assert torch.equal(layers[0].weight, source), "the source affine stays frozen"
    assert int(layers[0].num_batches_tracked) == 1


def test_two_dimensional_network():
    net = nets.UNet(2, 1, 1, channels=(4, 8), strides=(2,), norm="acnorm")
    assert any(isinstance(m, acn.ACNorm2d) for m in net.modules())
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 1, 8, 8)


def test_unsupported_dimension_is_a_clear_error():
    from monai.networks.layers.factories import Norm

    with pytest.raises(ValueError, match="acnorm: MONAI asked for AC-Norm in 4 spatial dimensions"):
        Norm["acnorm", 4]
