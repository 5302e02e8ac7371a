"""Module behaviour: state dicts, constructors, buffers, repr, dtypes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import acnorm_fused as acn

from helpers import make_layer, random_input


def _trained_bn(channels=6, seed=0):
    bn = nn.BatchNorm3d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    for step in range(3):
        bn(random_input((2, channels, 3, 3, 3), seed + step, mean=1.0))
    return bn


def test_loading_a_batchnorm_checkpoint_fills_source_and_target():
    bn = _trained_bn()
    layer = acn.ACNorm3d(6)
    result = layer.load_state_dict(bn.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name in ("weight", "weight_target"):
        assert torch.equal(getattr(layer, name), bn.weight)
    for name in ("bias", "bias_target"):
        assert torch.equal(getattr(layer, name), bn.bias)
    assert torch.equal(layer.running_mean, bn.running_mean)
    assert torch.equal(layer.running_var, bn.running_var)
    assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    assert not layer.weight.requires_grad and layer.weight_target.requires_grad


def test_resuming_an_acnorm_checkpoint_loads_it_as_saved():
    saved = make_layer(acn.ACNorm2d, 5, seed=1)
    layer = acn.ACNorm2d(5)
    layer.load_state_dict(saved.state_dict(), strict=True)
    for key, value in saved.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
    assert not torch.equal(layer.weight, layer.weight_target)


def test_checkpoint_kind_is_decided_per_layer():
    model = nn.Sequential(acn.ACNorm2d(3), acn.ACNorm2d(3))
    resumed = make_layer(acn.ACNorm2d, 3, seed=2)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.fill_(2.0)
        bn.bias.fill_(-1.0)
    state = {f"0.{k}": v for k, v in bn.state_dict().items()}
    state.update({f"1.{k}": v for k, v in resumed.state_dict().items()})
    model.load_state_dict(state, strict=True)
    assert torch.equal(model[0].weight_target, torch.full((3,), 2.0))
    assert torch.equal(model[1].weight_target, resumed.weight_target)


def test_half_a_target_affine_is_a_missing_key():
    state = make_layer(acn.ACNorm1d, 4, seed=3).state_dict()
    del state["bias_target"]
    with pytest.raises(RuntimeError, match="bias_target"):
        acn.ACNorm1d(4).load_state_dict(state, strict=True)


def test_state_dict_keys_are_the_authors_names():
    keys = set(acn.AffineCoNorm3d(4).state_dict())
    assert keys == {"weight", "bias", "weight_target", "bias_target",
                    "running_mean", "running_var", "num_batches_tracked"}


def test_authors_constructor():
    layer = acn.AffineCoNorm2d(8, 0.5, 1e-3, 0.2, True, True)
    assert (layer.temperature, layer.tem, layer.eps, layer.momentum) == (0.5, 0.5, 1e-3, 0.2)
    assert isinstance(layer, acn.ACNorm2d)
    assert acn.AffineCoNorm3d(4, tem=2).temperature == 2.0
    no_stats = acn.AffineCoNorm3d(4, track_running_stats=False)
    assert no_stats.running_mean is None


@pytest.mark.parametrize("cls", [acn.ACNorm1d, acn.ACNorm2d, acn.ACNorm3d])
def test_affine_false_is_refused_at_construction(cls):
    with pytest.raises(ValueError, match=f"{cls.__name__}: affine=False"):
        cls(4, affine=False)


def test_authors_affine_false_is_refused():
    with pytest.raises(ValueError, match="AffineCoNorm2d: affine=False"):
        acn.AffineCoNorm2d(4, affine=False)


def test_extra_repr():
    text = repr(acn.ACNorm3d(16, momentum=None, temperature=0.5, activation="leaky_relu",
                             negative_slope=0.2, backend="torch", double_update=False))
    assert text.startswith("ACNorm3d(16, eps=1e-05, momentum=None, temperature=0.5")
    for part in ("activation='leaky_relu'", "negative_slope=0.2", "backend='torch'",
                 "double_update=False"):
        assert part in text
    assert repr(acn.ACNorm2d(3)) == (
        "ACNorm2d(3, eps=1e-05, momentum=0.1, temperature=1.0, track_running_stats=True)"
    )


def test_defaults_and_reset():
    layer = make_layer(acn.ACNorm2d, 4, seed=4)
    layer(random_input((2, 4, 3, 3), 5))
    layer.reset_parameters()
    for name, value in [("weight", 1.0), ("bias", 0.0), ("weight_target", 1.0),
                        ("bias_target", 0.0), ("running_mean", 0.0), ("running_var", 1.0)]:
        assert torch.equal(getattr(layer, name), torch.full((4,), value)), name
    assert int(layer.num_batches_tracked) == 0


def test_num_batches_tracked_counts_training_calls_only():
    layer = acn.ACNorm1d(3)
    for _ in range(3):
        layer(random_input((4, 3), 6))
    layer.eval()
    layer(random_input((4, 3), 7))
    assert int(layer.num_batches_tracked) == 3


def test_factory_kwargs_and_dtype_conversion():
    layer = acn.ACNorm3d(4, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert layer.running_var.dtype == torch.float64
    assert layer.num_batches_tracked.dtype == torch.long
    out = layer(random_input((2, 4, 2, 2, 2), 8, torch.float64))
    assert out.dtype == torch.float64


def test_mixed_precision_keeps_float32_parameters():
    layer = make_layer(acn.ACNorm2d, 4, seed=9)
    x = random_input((2, 4, 3, 3), 10, torch.bfloat16).requires_grad_()
    out = layer(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert layer.weight_target.grad.dtype == torch.float32
    assert layer.running_mean.dtype == torch.float32


@pytest.mark.parametrize("cls,good,bad", [
    (acn.ACNorm1d, [(4, 3), (4, 3, 5)], [(4, 3, 5, 5)]),
    (acn.ACNorm2d, [(4, 3, 2, 2)], [(4, 3), (4, 3, 2, 2, 2)]),
    (acn.ACNorm3d, [(2, 3, 2, 2, 2)], [(4, 3, 2, 2)]),
])
def test_input_rank_per_class(cls, good, bad):
    layer = cls(3)
    for shape in good:
        assert layer(random_input(shape, 11)).shape == shape
    for shape in bad:
        with pytest.raises(ValueError, match=f"{cls.__name__}\\(3\\): expected"):
            layer(random_input(shape, 11))


def test_not_a_batchnorm_subclass():
    model = nn.Sequential(acn.ACNorm2d(3), nn.BatchNorm2d(3))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[0], acn.ACNorm2d)
    assert isinstance(converted[1], nn.SyncBatchNorm)
    assert not isinstance(acn.ACNorm2d(3), nn.modules.batchnorm._BatchNorm)
