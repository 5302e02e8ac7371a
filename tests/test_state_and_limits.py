"""Loading checkpoints into AC-Norm layers, temperatures at the edge of the
compute dtype, and second derivatives: what a BatchNorm replacement must get right."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import acnorm_fused as acn
from acnorm_fused.distributed import sync_ac_norm
from acnorm_fused.modules import ACNorm

from helpers import make_layer, random_input


def _bn_checkpoint(channels: int) -> dict:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
    bn.num_batches_tracked.fill_(7)
    return bn.state_dict()


def test_assign_load_keeps_source_and_target_apart():
    """load_state_dict(assign=True) of a BatchNorm checkpoint: the trainable target
    is a tensor of its own, so an optimizer step leaves the frozen source alone."""
    checkpoint = _bn_checkpoint(4)
    layer = acn.ACNorm2d(4)
    layer.load_state_dict(checkpoint, assign=True)
    assert layer.weight_target.data_ptr() != layer.weight.data_ptr()
    assert layer.bias_target.data_ptr() != layer.bias.data_ptr()
    assert torch.equal(layer.weight_target, checkpoint["weight"])
    source = layer.weight.detach().clone()
    optimizer = torch.optim.SGD([layer.weight_target, layer.bias_target], lr=0.5)
    layer(random_input((2, 4, 3, 3), 1)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(layer.weight_target, source), "the target trained"
    assert torch.equal(layer.weight, source), "the source stayed frozen"
    assert torch.equal(checkpoint["weight"], source), "the checkpoint is untouched"


def test_old_checkpoint_keeps_the_layers_counter():
    """A checkpoint without num_batches_tracked (older than the counter) leaves the
    layer's counter as it is, as BatchNorm does, also when the load fails."""
    layer = acn.ACNorm2d(4)
    layer.num_batches_tracked.fill_(5)
    bn = nn.BatchNorm2d(4)
    bn.num_batches_tracked.fill_(5)
    old = OrderedDict((k, v) for k, v in _bn_checkpoint(4).items() if k != "num_batches_tracked")
    old._metadata = {"": {"version": 1}}
    bad = OrderedDict(old, unexpected=torch.zeros(1))
    bad._metadata = old._metadata
    for module in (layer, bn):
        with pytest.raises(RuntimeError, match="Unexpected key"):
            module.load_state_dict(bad)
    assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == 5
    layer.load_state_dict(old)
    bn.load_state_dict(old)
    assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == 5


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_temperature_that_vanishes_in_the_compute_dtype(backend):
    layer = make_layer(acn.ACNorm2d, 4, seed=0, backend=backend, temperature=1e-300)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"ACNorm2d\(4\): temperature 1e-300 is below the smallest normal "
                                         r"torch.float32"):
        layer(random_input((2, 4, 3, 3), 1))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    # In float64 the correlation runs in float64, where 1e-300 is a normal number.
    out = layer.double()(random_input((2, 4, 3, 3), 1, torch.float64))
    assert torch.isfinite(out).all()
    w = torch.ones(3)
    with pytest.raises(ValueError, match="sync_ac_norm: temperature"):
        sync_ac_norm(torch.ones(2, 3), None, None, w, w, w, w, temperature=1e-39)


@pytest.mark.parametrize("backend", ["torch"])
def test_second_derivative_is_refused_not_wrong(backend):
    """The fused backward is not differentiable: asking for a second derivative
    through it is an error, on every fused backend (the reference backend is
    plain autograd and differentiates twice)."""
    layer = make_layer(acn.ACNorm2d, 3, seed=2, backend=backend)
    x = random_input((2, 3, 4, 4), 3).requires_grad_()
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        grad_x.sum().backward()
    reference = make_layer(acn.ACNorm2d, 3, seed=2, backend="reference")
    (grad_x,) = torch.autograd.grad(reference(x).square().sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad_x.sum(), reference.weight_target)
    assert torch.isfinite(second).all()


def test_convert_a_batchnorm_used_twice_in_one_parent():
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    acn.convert_model(model)
    assert isinstance(model[0], acn.ACNorm2d) and model[2] is model[0], "one shared layer, converted once"
    folded = acn.fold_to_batchnorm(model.eval())
    assert isinstance(folded[0], nn.BatchNorm2d) and folded[2] is folded[0]


def test_failed_conversion_changes_nothing():
    good, plain = nn.BatchNorm2d(3), nn.BatchNorm2d(3, affine=False)
    model = nn.Sequential(good, nn.Sequential(nn.ReLU(), plain))
    with pytest.raises(ValueError, match=r"convert_model: 1\.1 .*affine=False"):
        acn.convert_model(model)
    assert model[0] is good and model[1][1] is plain, "all or nothing"


class _BatchStatisticsNorm3d(nn.modules.batchnorm._BatchNorm):
    """As model zoos define it: derived from _BatchNorm, batch statistics always."""

    def _check_input_dim(self, x):
        if x.dim() != 5:
            raise ValueError(f"expected 5D input (got {x.dim()}D input)")

    def forward(self, x):
        self._check_input_dim(x)
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                        True, self.momentum, self.eps)


class _AnyRankNorm(nn.modules.batchnorm._BatchNorm):
    """A _BatchNorm subclass that checks no rank and keeps BatchNorm's forward."""


def test_batchnorm_subclasses_of_model_zoos_are_converted():
    model = nn.Sequential(nn.Conv3d(1, 4, 3), _BatchStatisticsNorm3d(4), nn.ReLU(), _AnyRankNorm(4))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    with pytest.warns(UserWarning, match=r"convert_model: 1 is a _BatchStatisticsNorm3d, a BatchNorm with a "
                                         r"forward of its own; it becomes ACNorm3d"):
        acn.convert_model(model)
    assert type(model[1]) is acn.ACNorm3d and type(model[3]) is ACNorm
    assert torch.equal(model[1].weight_target, model[1].weight)
    out = model(random_input((2, 1, 5, 5, 5), 4))
    assert out.shape == (2, 4, 3, 3, 3)


def test_uninitialised_lazy_batchnorm_is_an_error_not_a_skip():
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"convert_model: 1 \(LazyBatchNorm2d\) is not initialised yet; run a "
                                         r"forward first"):
        acn.convert_model(model)
    model(torch.randn(2, 1, 4, 4))
    acn.convert_model(model)
    assert isinstance(model[1], acn.ACNorm2d) and model[1].num_features == 3


def test_numpy_scalars_for_sizes_and_settings():
    np = pytest.importorskip("numpy")
    layer = acn.ACNorm2d(np.int64(4), eps=np.float32(1e-5), momentum=np.float64(0.1), temperature=np.float32(0.5))
    assert type(layer.num_features) is int and type(layer.eps) is float and type(layer.temperature) is float
    assert layer(random_input((2, 4, 3, 3), 1)).shape == (2, 4, 3, 3)
    bn = nn.BatchNorm2d(np.int64(4), eps=np.float32(1e-5))
    assert acn.convert_model(bn).num_features == 4


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_empty_batch_in_training_gives_an_empty_output(backend):
    """As BatchNorm: N = 0 gives an empty output of the input's shape; the running
    statistics and the counter stay; a wrong channel count is still an error."""
    layer = make_layer(acn.ACNorm2d, 4, seed=5, backend=backend)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.empty(0, 4, 3, 3, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match=r"ACNorm2d\(4\): expected input with 4 channels"):
        layer(torch.empty(0, 3, 3, 3))


def test_fold_and_ac_corr_refuse_non_finite_affines():
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3))
    acn.convert_model(model)
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[1].bias_target[1] = float("nan")
    with pytest.raises(ValueError, match=r"ac_corr: layer '1': bias_target contain\(s\) NaN"):
        acn.ac_corr(pretrained, model.state_dict())
    with pytest.raises(ValueError, match=r"fold_to_batchnorm: 1 \(ACNorm2d\(3\)\): bias_target contain\(s\) NaN"):
        acn.fold_to_batchnorm(model.eval())
    assert isinstance(model[1], acn.ACNorm2d), "a refused fold changes nothing"


@pytest.mark.parametrize("function", ["correlation", "effective_affine"])
def test_public_correlation_functions_check_their_arguments(function):
    call = getattr(acn, function)
    w = torch.ones(4)
    with pytest.raises(ValueError, match=rf"{function}: weight, bias, weight_target and bias_target must share "
                                         r"one 1-D shape, got \(4,\), \(4,\), \(4,\), \(3,\)"):
        call(w, w, w, torch.ones(3))
    with pytest.raises(TypeError, match=rf"{function}: bias must be a floating-point tensor"):
        call(w, torch.ones(4, dtype=torch.long), w, w)
    with pytest.raises(TypeError, match=rf"{function}: weight_target must be a Tensor, got list"):
        call(w, w, [1.0] * 4, w)
    assert call(w, w, w, w) is not None


@pytest.mark.parametrize("backend,channels", [("auto", 4), ("reference", 4), ("auto", 1024)])
def test_forward_on_the_meta_device(backend, channels):
    """Shape inference and deferred initialisation: a layer on the meta device
    runs forward and backward, training and eval, without reading any value
    (1024 channels: the windowed C x C step too); a kernel backend that cannot
    take meta tensors says so, naming the layer."""
    layer = acn.ACNorm3d(channels, backend=backend).to("meta")
    x = torch.empty(2, channels, 3, 3, 3, device="meta", requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape and out.device.type == "meta"
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert layer.eval()(x).shape == x.shape
    with pytest.raises(RuntimeError, match=rf"ACNorm3d\({channels}\): backend 'cuda' "):
        acn.ACNorm3d(channels, backend="cuda").to("meta")(x)
