"""Bad input: clear errors naming the module, nothing of the user's touched."""

from __future__ import annotations

import copy

import pytest
import torch

import acnorm_fused as acn
from acnorm_fused import backends
from acnorm_fused.backends import resolve_backend

from helpers import make_layer, random_input


def _snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _assert_untouched(layer, snapshot):
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, snapshot[key], rtol=0, atol=0, equal_nan=True,
                                   msg=f"{key} changed by a failed call")


def _fails(layer, x, exc, match):
    before = _snapshot(layer)
    with pytest.raises(exc, match=match):
        layer(x)
    _assert_untouched(layer, before)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_wrong_channel_count(backend):
    layer = make_layer(acn.ACNorm2d, 4, seed=0, backend=backend)
    _fails(layer, random_input((2, 3, 2, 2), 1), ValueError, r"ACNorm2d\(4\): expected input with 4 channels")


def test_wrong_rank_functional_and_module():
    layer = make_layer(acn.ACNorm3d, 4, seed=0)
    _fails(layer, random_input((2, 4, 2, 2), 1), ValueError, r"ACNorm3d\(4\): expected 5D input")
    w = torch.ones(4)
    for shape in [(4,), (1, 4, 1, 1, 1, 2)]:
        with pytest.raises(ValueError, match="ac_norm: expected an input of 2 to 5 dimensions"):
            acn.ac_norm(torch.ones(shape), None, None, w, w, w, w)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_one_value_per_channel_in_training(backend):
    layer = make_layer(acn.ACNorm1d, 3, seed=0, backend=backend)
    _fails(layer, random_input((1, 3), 1), ValueError, r"ACNorm1d\(3\): expected more than 1 value per channel")
    _fails(layer, random_input((1, 3, 1), 1), ValueError, "more than 1 value per channel")
    layer.eval()
    assert layer(random_input((1, 3), 1)).shape == (1, 3)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name,value", [("weight_target", float("nan")), ("bias", float("inf")),
                                        ("weight", float("-inf")), ("bias_target", float("nan"))])
def test_non_finite_parameters(backend, name, value):
    layer = make_layer(acn.ACNorm2d, 4, seed=0, backend=backend)
    with torch.no_grad():
        getattr(layer, name)[2] = value
    _fails(layer, random_input((2, 4, 3, 3), 1), ValueError, rf"ACNorm2d\(4\): {name} contain")


def test_parameter_on_another_device():
    layer = make_layer(acn.ACNorm2d, 4, seed=0)
    layer.weight_target = torch.nn.Parameter(torch.empty(4, device="meta"))
    with pytest.raises(RuntimeError, match=r"ACNorm2d\(4\): weight_target is on meta but the input is on cpu"):
        layer(random_input((2, 4, 3, 3), 1))


def test_parameter_dtypes():
    layer = make_layer(acn.ACNorm2d, 4, seed=0)
    layer.bias_target.data = layer.bias_target.data.double()
    _fails(layer, random_input((2, 4, 3, 3), 1), TypeError, "must share one dtype")
    layer = make_layer(acn.ACNorm2d, 4, seed=0)
    _fails(layer, random_input((2, 4, 3, 3), 1, torch.float64), TypeError,
           r"ACNorm2d\(4\): float64 inputs and float64 parameters go together")
    layer.running_mean = torch.zeros(4, dtype=torch.long)
    _fails(layer, random_input((2, 4, 3, 3), 1), TypeError, "running_mean must be a floating-point")
    w = torch.ones(4)
    with pytest.raises(TypeError, match="input dtype must be"):
        acn.ac_norm(torch.ones(2, 4, dtype=torch.int32), None, None, w, w, w, w)


def test_parameter_shapes():
    w = torch.ones(4)
    with pytest.raises(ValueError, match=r"bias_target must have shape \(4,\)"):
        acn.ac_norm(torch.ones(2, 4), None, None, w, w, w, torch.ones(5))
    with pytest.raises(ValueError, match="running_mean and running_var must be given together"):
        acn.ac_norm(torch.ones(2, 4), torch.zeros(4), None, w, w, w, w)
    with pytest.raises(ValueError, match="required when training=False"):
        acn.ac_norm(torch.ones(2, 4), None, None, w, w, w, w, training=False)


def test_hyperparameters():
    for kwargs, match in [({"eps": 0.0}, "eps must be"), ({"momentum": 1.5}, "momentum must be"),
                          ({"temperature": 0}, "temperature must be"),
                          ({"activation": "gelu"}, "activation must be"),
                          ({"backend": "numpy"}, "backend must be one of")]:
        with pytest.raises(ValueError, match=f"ACNorm3d: {match}"):
            acn.ACNorm3d(4, **kwargs)
    for bad in [0, -3, 2.5, True]:
        with pytest.raises(ValueError, match="num_features must be a positive int"):
            acn.ACNorm1d(bad)
    w = torch.ones(3)
    with pytest.raises(ValueError, match="ac_norm: momentum must be a number"):
        acn.ac_norm(torch.ones(2, 3), None, None, w, w, w, w, momentum=None)


def test_unavailable_backend_is_an_error_not_a_fallback():
    """backend="cuda" on a CPU tensor, with or without the compiled module installed."""
    layer = make_layer(acn.ACNorm2d, 4, seed=0, backend="cuda")
    _fails(layer, random_input((2, 4, 3, 3), 1), RuntimeError,
           r"ACNorm2d\(4\): backend 'cuda' (runs CUDA tensors|needs the compiled extension)")


def test_triton_backend_without_triton_says_what_to_install(monkeypatch):
    monkeypatch.setattr(backends, "_TRITON_INSTALLED", False)
    layer = make_layer(acn.ACNorm2d, 4, seed=0, backend="triton")
    _fails(layer, random_input((2, 4, 3, 3), 1), RuntimeError, r"needs the triton package \(pip install")


def test_backend_environment_override(monkeypatch):
    x = torch.ones(2, 3)
    assert resolve_backend("auto", x, "t") == "torch"
    monkeypatch.setenv("ACNORM_BACKEND", "reference")
    assert resolve_backend("auto", x, "t") == "reference"
    assert resolve_backend("torch", x, "t") == "torch", "an explicit backend wins"
    monkeypatch.setenv("ACNORM_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"t \(ACNORM_BACKEND\): backend must be one of"):
        resolve_backend("auto", x, "t")


def test_failed_call_leaves_optimizer_visible_state_alone():
    layer = make_layer(acn.ACNorm3d, 4, seed=0)
    layer(random_input((2, 4, 2, 2, 2), 1))  # a good call first
    good = copy.deepcopy(layer)
    with torch.no_grad():
        layer.weight_target[0] = float("nan")
    with pytest.raises(ValueError):
        layer(random_input((2, 4, 2, 2, 2), 2))
    assert int(layer.num_batches_tracked) == int(good.num_batches_tracked)
    assert torch.equal(layer.running_mean, good.running_mean)
    assert torch.equal(layer.running_var, good.running_var)
