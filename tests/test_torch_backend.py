"""The torch backend against the reference over ranks, dtypes, layouts and edge cases."""

from __future__ import annotations

import copy

import pytest
import torch

import acnorm_fused as acn
from acnorm_fused.backends import pytorch as pytorch_backend
from acnorm_fused.functional import effective_momentum

from helpers import assert_close, make_affines, make_layer, random_input

SHAPES = [(6, 3), (2, 4, 7), (2, 3, 5, 6), (2, 3, 3, 4, 5)]


@pytest.fixture(params=["aten", "own"])
def statistics_path(request, monkeypatch):
    """Run a test through both training-statistics paths of the torch backend,
    whatever the input size (the own path normally starts at 2^18 elements)."""
    threshold = 0 if request.param == "own" else 1 << 62
    monkeypatch.setattr(pytorch_backend, "_OWN_REDUCTIONS_MIN_NUMEL", threshold)
    return request.param


def _run_pair(layer, x, steps=3, seed=0):
    """Train a torch-backend copy and a reference copy of ``layer`` on the same
    batches, then run both in eval; return both copies and their outputs/grads."""
    results = {}
    for backend in ("torch", "reference"):
        model = copy.deepcopy(layer)
        model.backend = backend
        model.train()
        outs, grads = [], []
        for step in range(steps):
            xi = (x + step).detach().requires_grad_()
            out = model(xi)
            g = random_input(out.shape, seed + step, out.dtype)
            out.backward(g)
            outs.append(out.detach())
            grads.append((xi.grad, model.weight_target.grad.clone(), model.bias_target.grad.clone()))
            model.weight_target.grad = None
            model.bias_target.grad = None
        model.eval()
        xe = x.detach().requires_grad_()
        eval_out = model(xe)
        eval_out.backward(torch.ones_like(eval_out))
        results[backend] = (model, outs, grads, eval_out.detach(), xe.grad)
    return results


def _assert_same(results, dtype, scale=1.0):
    t_model, t_outs, t_grads, t_eval, t_eval_grad = results["torch"]
    r_model, r_outs, r_grads, r_eval, r_eval_grad = results["reference"]
    for a, b in zip(t_outs, r_outs):
        assert_close(a, b, dtype, scale)
    for ga, gb in zip(t_grads, r_grads):
        for a, b in zip(ga, gb):
            assert_close(a, b, dtype, scale * 10)
    for name in ("running_mean", "running_var"):
        assert_close(getattr(t_model, name), getattr(r_model, name), torch.float32, scale)
    assert int(t_model.num_batches_tracked) == int(r_model.num_batches_tracked) == len(t_outs)
    assert_close(t_eval, r_eval, dtype, scale)
    assert_close(t_eval_grad, r_eval_grad, dtype, scale * 10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("momentum", [0.1, 0.6])
def test_matches_reference_float64(shape, temperature, momentum, layer_classes, statistics_path):
    cls = layer_classes[len(shape)]
    layer = make_layer(cls, shape[1], seed=1, dtype=torch.float64,
                       temperature=temperature, momentum=momentum)
    x = random_input(shape, 2, torch.float64, mean=1.0, std=2.0)
    _assert_same(_run_pair(layer, x), torch.float64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu"])
def test_matches_reference_float32(shape, activation, layer_classes, statistics_path):
    cls = layer_classes[len(shape)]
    layer = make_layer(cls, shape[1], seed=3, activation=activation, negative_slope=0.1)
    x = random_input(shape, 4)
    _assert_same(_run_pair(layer, x), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_with_float32_parameters(dtype):
    layer = make_layer(acn.ACNorm3d, 4, seed=5)
    x = random_input((2, 4, 3, 4, 5), 6, dtype)
    results = _run_pair(layer, x)
    model, outs, grads, eval_out, _ = results["torch"]
    assert outs[0].dtype == dtype and eval_out.dtype == dtype
    assert grads[0][0].dtype == dtype
    assert model.weight_target.dtype == model.running_mean.dtype == torch.float32
    assert grads[0][1].dtype == torch.float32
    _assert_same(results, dtype)


@pytest.mark.parametrize("shape,memory_format", [
    ((2, 5, 6, 7), torch.channels_last),
    ((2, 5, 3, 4, 6), torch.channels_last_3d),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_keeps_layout_and_values(shape, memory_format, dtype):
    cls = acn.ACNorm2d if len(shape) == 4 else acn.ACNorm3d
    layer = make_layer(cls, shape[1], seed=7)
    x = random_input(shape, 8, dtype)
    xc = x.contiguous(memory_format=memory_format)
    a, b = copy.deepcopy(layer), copy.deepcopy(layer)
    out_cl = a(xc.requires_grad_())
    out = b(x.requires_grad_())
    assert out_cl.is_contiguous(memory_format=memory_format)
    assert_close(out_cl, out, dtype)
    g = random_input(shape, 9, dtype)
    out_cl.backward(g.contiguous(memory_format=memory_format))
    out.backward(g)
    assert_close(xc.grad, x.grad, dtype, 10)
    assert_close(a.weight_target.grad, b.weight_target.grad, torch.float32, 100)
    ref = copy.deepcopy(layer)
    ref.backend = "reference"
    assert_close(out_cl, ref(xc.detach()), dtype)


def test_non_contiguous_input():
    layer = make_layer(acn.ACNorm3d, 3, seed=10)
    base = random_input((2, 6, 4, 5, 8), 11)
    x = base[:, ::2, :, 1:, ::2]  # strided in several dims
    assert not x.is_contiguous()
    ref = copy.deepcopy(layer)
    ref.backend = "reference"
    assert_close(copy.deepcopy(layer)(x), ref(x.contiguous()), torch.float32)


def test_gradcheck_float64():
    # With respect to x. The target affine also enters S, through which no
    # gradient flows by definition, so finite differences in it would not
    # match; its gradient is checked against the hand formula elsewhere.
    w, b, wt, bt = make_affines(3, 12, torch.float64)
    x = random_input((2, 3, 4, 3), 13, torch.float64).requires_grad_(True)
    rm = torch.randn(3, dtype=torch.float64)
    rv = 0.5 + torch.rand(3, dtype=torch.float64)
    for training, stats, activation in [(True, None, None), (True, None, "leaky_relu"),
                                        (False, (rm, rv), None), (False, (rm, rv), "leaky_relu")]:
        def fn(x_, stats=stats, training=training, activation=activation):
            return acn.ac_norm(x_, *(stats or (None, None)), w, b, wt, bt, training=training,
                               activation=activation, negative_slope=0.3, backend="torch")
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_source_affine_gets_no_gradient():
    layer = make_layer(acn.ACNorm2d, 4, seed=14)
    layer.weight.requires_grad_(True)
    layer.bias.requires_grad_(True)
    layer(random_input((3, 4, 2, 2), 15)).square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.weight_target.grad is not None and layer.bias_target.grad is not None


def test_two_values_per_channel():
    layer = make_layer(acn.ACNorm1d, 5, seed=16)
    x = random_input((2, 5), 17)
    ref = copy.deepcopy(layer)
    ref.backend = "reference"
    assert_close(layer(x), ref(x), torch.float32)


def test_constant_channel_stays_finite(statistics_path):
    layer = make_layer(acn.ACNorm3d, 3, seed=18)
    x = random_input((2, 3, 2, 3, 4), 19)
    x[:, 1] = 7.0
    x.requires_grad_(True)
    out = layer(x)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    with torch.no_grad():
        _, b = acn.effective_affine(layer.weight, layer.bias, layer.weight_target, layer.bias_target)
    # x - mean is zero up to the rounding of the mean, which 1/sqrt(eps) magnifies.
    torch.testing.assert_close(out[:, 1].detach(), torch.full_like(out[:, 1], float(b[1])),
                               rtol=0, atol=1e-3)
    ref = make_layer(acn.ACNorm3d, 3, seed=18, backend="reference")(x.detach())
    assert_close(out[:, ::2], ref[:, ::2], torch.float32)


def test_large_mean_float32(statistics_path):
    # CT-like intensities: a large mean with a small spread.
    layer = make_layer(acn.ACNorm3d, 4, seed=20)
    x = random_input((2, 4, 5, 6, 7), 21, torch.float64, mean=3000.0, std=2.0)
    ref = make_layer(acn.ACNorm3d, 4, seed=20, dtype=torch.float64, backend="reference")
    out = layer(x.float())
    expected = ref(x)
    assert_close(out, expected, torch.float32, scale=100)
    assert_close(layer.running_var, ref.running_var, torch.float32, scale=100)


def test_odd_sizes_and_one_channel(statistics_path):
    for shape in [(3, 1, 7), (1, 1, 3, 5), (3, 7, 1, 1, 5), (5, 13)]:
        cls = {2: acn.ACNorm1d, 3: acn.ACNorm1d, 4: acn.ACNorm2d, 5: acn.ACNorm3d}[len(shape)]
        layer = make_layer(cls, shape[1], seed=22, dtype=torch.float64)
        x = random_input(shape, 23, torch.float64)
        _assert_same(_run_pair(layer, x), torch.float64)


@pytest.mark.parametrize("double_update", [True, False])
def test_running_stats_equal_batchnorm_with_the_equivalent_momentum(double_update, statistics_path):
    layer = make_layer(acn.ACNorm3d, 4, seed=24, momentum=0.2, double_update=double_update)
    bn = torch.nn.BatchNorm3d(4, momentum=effective_momentum(0.2, double_update))
    bn.running_mean.copy_(layer.running_mean)
    bn.running_var.copy_(layer.running_var)
    for step in range(4):
        x = random_input((2, 4, 3, 3, 3), 25 + step)
        layer(x)
        bn(x)
    assert_close(layer.running_mean, bn.running_mean, torch.float32)
    assert_close(layer.running_var, bn.running_var, torch.float32)


def test_momentum_none_is_a_cumulative_average(statistics_path):
    layer = acn.ACNorm2d(3, momentum=None)
    bn = torch.nn.BatchNorm2d(3, momentum=None)
    for step in range(5):
        x = random_input((4, 3, 2, 3), 30 + step, mean=step)
        layer(x)
        bn(x)
    assert int(layer.num_batches_tracked) == 5
    assert_close(layer.running_mean, bn.running_mean, torch.float32)
    assert_close(layer.running_var, bn.running_var, torch.float32)


def test_track_running_stats_false_uses_batch_stats_in_eval():
    layer = make_layer(acn.ACNorm2d, 3, seed=35, track_running_stats=False)
    assert layer.running_mean is None and layer.num_batches_tracked is None
    x = random_input((4, 3, 2, 2), 36).requires_grad_()
    layer.eval()
    out = layer(x)
    ref = copy.deepcopy(layer)
    ref.backend = "reference"
    assert_close(out, ref(x), torch.float32)
    out.sum().backward()
    assert layer.weight_target.grad is not None


@pytest.mark.parametrize("shape", [(2, 3, 5), (3, 4, 5, 6), (2, 5, 3, 4, 7), (1, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mean", [0.0, 3000.0])
@pytest.mark.parametrize("statistics_path", ["own"], indirect=True)
def test_own_statistics_match_aten_batchnorm(shape, dtype, mean, statistics_path):
    # The backend's own reductions against their twin, ATen's kernel.
    x = random_input(shape, 40, dtype, mean=mean, std=2.0)
    w, b = torch.rand(shape[1], dtype=dtype) + 0.5, torch.randn(shape[1], dtype=dtype)
    out, mean_, var, invstd = pytorch_backend._train_forward_own_reductions(x.clone(), w, b, 1e-5)
    ref_out, ref_mean, ref_invstd = torch.native_batch_norm(x, w, b, None, None, True, 0.0, 1e-5)
    exact = x.double()
    dims = [0] + list(range(2, x.dim()))
    exact_var = exact.var(dims, unbiased=False)
    scale = 1.0 if mean == 0.0 else 100.0  # fp32 rounding of the data itself at 3000
    assert_close(mean_, exact.mean(dims), dtype, scale)
    assert_close(var, exact_var, dtype, scale)
    assert_close(invstd, ref_invstd, dtype, scale)
    assert_close(out, ref_out, dtype, scale)


def test_which_inputs_take_the_own_statistics():
    x = random_input((2, 4, 32, 32, 32), 41)  # 2^18 elements
    assert pytorch_backend._uses_own_reductions(x)
    assert pytorch_backend._uses_own_reductions(x.double())
    assert not pytorch_backend._uses_own_reductions(x[:, :, :16])
    assert not pytorch_backend._uses_own_reductions(x.to(memory_format=torch.channels_last_3d))
    assert not pytorch_backend._uses_own_reductions(x.bfloat16())
    assert not pytorch_backend._uses_own_reductions(x.view(2, -1, 1, 1))


def test_own_statistics_at_their_real_size():
    layer = make_layer(acn.ACNorm3d, 4, seed=43, activation="relu")
    x = random_input((2, 4, 32, 32, 32), 44, mean=5.0, std=3.0)
    assert pytorch_backend._uses_own_reductions(x)
    _assert_same(_run_pair(layer, x, steps=2), torch.float32)
