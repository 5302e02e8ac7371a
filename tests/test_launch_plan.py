"""Launch plans: a layer's cached eager path to the kernels, or to the torch
backend on a CPU (acnorm_fused.backends.plan).

The planned path must give exactly what the general path gives (same
kernels, same order of arithmetic), fall back to the general path whenever
the layer or its input changes, refuse bad parameters as the general path
does without touching the layer's state, and cost the host no more than the
bars of the project (counted, not timed, with the launches doing nothing).
The cuda plans here run the multi-pass kernels, as the general path does;
their single pass, which only plans run, is held to the reference in
test_single_pass.py.
"""

from __future__ import annotations

import copy
import math
import pickle
import types

import pytest
import torch

import acnorm_fused as acn
from acnorm_fused import backends, modules
from acnorm_fused.backends import abi
from acnorm_fused.backends import cuda as cuda_backend
from acnorm_fused.backends.plan import LaunchPlan
from acnorm_fused.bench import host
from acnorm_fused.bench.cases import COST_CASE, make_input
from acnorm_fused.bench.timing import training_step

from helpers import assert_close, make_layer, random_input

pytestmark = pytest.mark.interpret

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
LAYER_CLASSES = {2: acn.ACNorm1d, 3: acn.ACNorm1d, 4: acn.ACNorm2d, 5: acn.ACNorm3d}


@pytest.fixture
def backend(planning_backend, monkeypatch):
    """The backend under test (see conftest.planning_backend), the cuda plans
    on the general path's multi-pass kernels."""
    monkeypatch.setattr(cuda_backend, "resident_capacity", lambda *args: 0)
    return planning_backend


def _plans(layer) -> dict:
    return layer.__dict__.get("_plans", {})


def _general(layer, x):
    """The layer's output through the general path (the functional op), state moved as the module moves it."""
    momentum, double_update = layer._update_rule()
    use_batch_stats = layer.training or layer.running_mean is None
    tracks = not layer.training or layer.track_running_stats
    out = acn.ac_norm(x, layer.running_mean if tracks else None, layer.running_var if tracks else None,
                      layer.weight, layer.bias, layer.weight_target, layer.bias_target,
                      training=use_batch_stats, momentum=momentum, double_update=double_update,
                      eps=layer.eps, temperature=layer.temperature, activation=layer.activation,
                      negative_slope=layer.negative_slope, backend=layer.backend)
    if layer.training and layer.track_running_stats:
        layer.num_batches_tracked.add_(1)
    return out


CASES = [
    ((2, 3, 3, 4, 5), "contiguous", {"activation": "relu"}),
    ((2, 3, 3, 4, 5), "channels_last", {"activation": "leaky_relu", "negative_slope": 0.2}),
    ((2, 5, 4, 3), "channels_last", {}),
    ((6, 4), "contiguous", {"track_running_stats": False}),
    ((3, 2, 7), "contiguous", {"double_update": False, "momentum": 0.3}),
]


@pytest.mark.parametrize("shape,layout,options", CASES, ids=lambda c: str(c).replace(" ", ""))
def test_plan_is_bit_identical_to_the_general_path(backend, shape, layout, options):
    layer = make_layer(LAYER_CLASSES[len(shape)], shape[1], seed=len(shape), backend=backend, **options)
    planned, general = copy.deepcopy(layer).to(DEVICE), copy.deepcopy(layer).to(DEVICE)
    memory_format = CHANNELS_LAST[len(shape)] if layout == "channels_last" else torch.contiguous_format
    for step, training in enumerate((True, True, True, False, False)):
        planned.train(training)
        general.train(training)
        x = random_input(shape, 30 + step).to(DEVICE).contiguous(memory_format=memory_format)
        grad = random_input(shape, 40 + step).to(DEVICE).contiguous(memory_format=memory_format)
        xp, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_p, out_g = planned(xp), _general(general, xg)
        out_p.backward(grad)
        out_g.backward(grad)
        assert _plans(planned), "the layer keeps a plan for its input"
        assert out_p.is_contiguous(memory_format=memory_format)
        assert torch.equal(out_p, out_g), step
        assert torch.equal(xp.grad, xg.grad), step
        for name in ("weight_target", "bias_target"):
            assert torch.equal(getattr(planned, name).grad, getattr(general, name).grad), (step, name)
        for (name, mine), theirs in zip(planned.named_buffers(), general.buffers()):
            assert torch.equal(mine, theirs), (step, name)
        planned.zero_grad()
        general.zero_grad()
    assert planned.weight.grad is None and planned.bias.grad is None
    assert len(_plans(planned)) == 2, "one plan for training, one for eval"


def test_plan_is_reused_until_the_layer_changes(backend, monkeypatch):
    calls = []
    checked = modules.checked_backend
    monkeypatch.setattr(modules, "checked_backend", lambda *a, **k: calls.append(a) or checked(*a, **k))
    layer = make_layer(acn.ACNorm2d, 3, seed=1, backend=backend).to(DEVICE)
    x = random_input((2, 3, 4, 4), 2).to(DEVICE)
    for _ in range(3):
        layer(x)
    assert len(calls) == 1, "the checks run when the plan is built, not on every call"
    layer(random_input((2, 3, 5, 4), 3).to(DEVICE))
    assert len(calls) == 2, "a new shape builds a new plan"
    layer.temperature = 0.5  # any setting: the plans go
    assert not _plans(layer)
    general = copy.deepcopy(layer)
    out = layer(x)
    assert len(calls) == 3
    assert torch.equal(out, _general(general, x)), "the new plan has the new temperature"
    assert torch.equal(layer.running_var, general.running_var)


def test_moved_parameters_take_the_general_path_and_its_errors(backend):
    layer = make_layer(acn.ACNorm2d, 4, seed=0, backend=backend).to(DEVICE)
    x = random_input((2, 4, 3, 3), 1).to(DEVICE)
    layer(x)
    layer.bias_target.data = layer.bias_target.data.double()  # no attribute is set: the pointer moves
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(TypeError, match="must share one dtype"):
        layer(x)
    for key, value in layer.state_dict().items():
        assert torch.equal(value.double(), before[key].double()), key


@pytest.mark.parametrize("channels", [4, 48])
@pytest.mark.parametrize("how", ["in_place", "through_data"])
@pytest.mark.parametrize("name", ["weight", "bias", "weight_target", "bias_target"])
def test_non_finite_parameters_on_the_planned_path(backend, how, name, channels):
    """The finalise kernel (or, on the torch backend, the check before the
    dense S or inside the compiled windows' call, from 32 channels) finds them;
    the call raises naming the layer and the parameter, and leaves the running
    statistics and the counter alone. Written through ``.data`` (no version
    counter moves) they are found all the same."""
    if DEVICE.type == "cuda":
        pytest.skip("on a GPU the kernel's finding is read by the next call (test_gpu.py)")
    layer = make_layer(acn.ACNorm2d, channels, seed=0, backend=backend)
    x = random_input((2, channels, 3, 3), 1)
    layer(x)
    assert _plans(layer)
    target = getattr(layer, name)
    with torch.no_grad():
        (target.data if how == "through_data" else target)[2] = float("nan") if how == "in_place" else -math.inf
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=rf"ACNorm2d\({channels}\): {name} contain\(s\) NaN or infinite"):
        layer(x)
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True, msg=key)
    with torch.no_grad():
        target[2] = 1.0
    layer(x)  # fixed: the same plan runs again
    assert int(layer.num_batches_tracked) == 2


def test_copies_and_pickles_build_their_own_plans(backend):
    layer = make_layer(acn.ACNorm3d, 3, seed=4, backend=backend).to(DEVICE)
    x = random_input((2, 3, 2, 3, 4), 5).to(DEVICE)
    layer(x)
    assert _plans(layer)
    clone = copy.deepcopy(layer)
    restored = pickle.loads(pickle.dumps(layer))
    for other in (clone, restored):
        assert not _plans(other)
        assert torch.equal(other(x), layer(x))
        assert _plans(other)


def test_gradient_in_another_layout(backend):
    """A channels-last output gradient for a contiguous input: the plan copies it
    to the input's layout, as the general path does."""
    layer = make_layer(acn.ACNorm3d, 3, seed=6, backend=backend, activation="relu").to(DEVICE)
    general = copy.deepcopy(layer)
    x = random_input((2, 3, 3, 2, 4), 7).to(DEVICE)
    grad = random_input((2, 3, 3, 2, 4), 8).to(DEVICE).contiguous(memory_format=torch.channels_last_3d)
    xp, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(xp).backward(grad)
    _general(general, xg).backward(grad)
    assert torch.equal(xp.grad, xg.grad)
    assert torch.equal(layer.weight_target.grad, general.weight_target.grad)


def test_double_backward_is_refused(backend):
    layer = make_layer(acn.ACNorm2d, 3, seed=9, backend=backend).to(DEVICE)
    x = random_input((2, 3, 4, 4), 10).to(DEVICE).requires_grad_()
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        grad_x.sum().backward()


def test_compiling_a_layer_that_has_plans(backend):
    """Traced code takes the custom op, whatever plans the layer holds, with no graph break."""
    torch._dynamo.reset()
    layer = make_layer(acn.ACNorm3d, 3, seed=13, backend=backend, activation="relu").to(DEVICE)
    x = random_input((2, 3, 2, 3, 4), 14).to(DEVICE)
    layer(x)
    assert _plans(layer)
    reference = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), _general(reference, x))
    torch.testing.assert_close(layer.running_var, reference.running_var)
    assert int(layer.num_batches_tracked) == int(reference.num_batches_tracked) == 2


def test_momentum_none_and_strided_inputs_take_the_general_path(backend):
    layer = make_layer(acn.ACNorm2d, 3, seed=11, backend=backend, momentum=None).to(DEVICE)
    layer(random_input((2, 3, 4, 4), 12).to(DEVICE))
    assert not _plans(layer), "momentum=None moves with the counter"
    layer = make_layer(acn.ACNorm2d, 3, seed=11, backend=backend).to(DEVICE)
    layer(random_input((2, 6, 4, 4), 12).to(DEVICE)[:, ::2])
    assert not _plans(layer), "a strided input is copied by the general path"


def test_training_without_tracking_on_a_layer_that_has_buffers(backend):
    """track_running_stats switched off after construction: the buffers stay but a
    training call leaves them out, so no plan fits it; the output is still the op's."""
    layer = make_layer(acn.ACNorm2d, 3, seed=13, backend=backend).to(DEVICE)
    layer.track_running_stats = False
    before = layer.running_mean.clone()
    x = random_input((2, 3, 4, 4), 14).to(DEVICE)
    for _ in range(2):  # the first call builds plans where it can, the second would use them
        out = layer(x)
        assert isinstance(out, torch.Tensor)
        expected = acn.ac_norm(x, None, None, layer.weight, layer.bias, layer.weight_target, layer.bias_target,
                               training=True, backend="torch")
        assert_close(out, expected)
    torch.testing.assert_close(layer.running_mean, before, rtol=0, atol=0)


def test_host_cost_of_an_eager_step_within_budget(emulated_cuda_module):
    """Per eager training step of backend="cuda" at (2, 64, 4, 4, 4) fp32, its
    launches doing nothing: Python calls and aten ops at most 2x, new storages
    at most 1.5x those of nn.BatchNorm3d (the project's CPU proxy for the host
    bar). Counts, not times: they are the same on every machine."""
    x, grad = make_input(COST_CASE, torch.device("cpu"))
    with host.noop_cuda_launches(emulated_cuda_module):
        layers = host.cost_layers(x.shape[1], cuda=True)
        costs = host.step_costs(
            {name: (lambda layer=layer: training_step(layer, x, grad))
             for name, layer in layers.items()}, rounds=1, per_round=1, count_steps=3)
    bn, fused = costs["batchnorm"], costs["acnorm-cuda"]
    assert fused.python_calls <= 2.0 * bn.python_calls, (fused, bn)
    assert fused.aten_ops <= 2.0 * bn.aten_ops, (fused, bn)
    assert fused.new_storages <= 1.5 * bn.new_storages, (fused, bn)
    # The counter sees the operators at all: BatchNorm's step runs some.
    assert bn.aten_ops >= 2 and bn.new_storages >= 1


def test_compiled_module_numbers_as_the_package_does(emulated_cuda_module):
    abi.check_module_abi(emulated_cuda_module)
    assert emulated_cuda_module.AUX_ROWS == abi.AUX_ROWS == len(set(abi.AUX_ROW.values()))
    assert dict(emulated_cuda_module.AUX_ROW) == abi.AUX_ROW
    assert tuple(emulated_cuda_module.NON_FINITE_BITS) == abi.NON_FINITE_BITS
    other = types.SimpleNamespace(DTYPE_CODES={"float32": 0, "float16": 2, "bfloat16": 1},
                                  ACTIVATION_CODES=abi.ACTIVATION_CODES, AUX_ROWS=abi.AUX_ROWS,
                                  NON_FINITE_BITS=abi.NON_FINITE_BITS)
    with pytest.raises(RuntimeError, match="built from other sources than this package: its DTYPE_CODES"):
        abi.check_module_abi(other)


def test_triton_kernels_read_the_shared_numbering():
    pytest.importorskip("triton")
    from acnorm_fused.backends.triton import finalize, primitives

    assert (primitives.ACT_RELU.value, primitives.ACT_LEAKY_RELU.value) == (
        abi.ACTIVATION_CODES["relu"], abi.ACTIVATION_CODES["leaky_relu"])
    bits = (finalize.NON_FINITE_GAMMA_S, finalize.NON_FINITE_BETA_S, finalize.NON_FINITE_GAMMA_T,
            finalize.NON_FINITE_BETA_T)
    assert tuple(bit.value for bit in bits) == abi.NON_FINITE_BITS
    rows = {name: getattr(primitives, f"AUX_{name.upper()}").value for name in abi.AUX_ROW}
    assert rows == abi.AUX_ROW


def test_backends_state_what_they_run():
    assert list(backends.REGISTRY) == ["reference", "torch", "triton", "cuda"]
    assert backends.BACKENDS == ("auto", *backends.REGISTRY)
    for backend in backends.REGISTRY.values():
        assert backend.summary and backend.devices and backend.dtypes
    assert set(acn.available_backends()) <= set(backends.REGISTRY)
    assert backends.REGISTRY["torch"].refusal(torch.zeros(2, 3, dtype=torch.float64), "t") is None
    error = backends.REGISTRY["cuda"].refusal(torch.zeros(2, 3, dtype=torch.float64), "t")
    if backends.cuda_extension() is not None:
        assert isinstance(error, TypeError) and "runs float32, float16 and bfloat16" in str(error)
    else:
        assert isinstance(error, RuntimeError) and "needs the compiled extension" in str(error)


def test_plan_reads_tensors_in_the_layers_order():
    layer = acn.ACNorm1d(3)
    names = ("weight", "bias", "weight_target", "bias_target", "running_mean", "running_var")
    assert all(t is getattr(layer, n) for t, n in zip(LaunchPlan.tensors_of(layer), names))


def test_step_plan_takes_keywords_only(emulated_cuda_module):
    """The module's StepPlan is built by keyword, so a reordered field cannot slip by."""
    from acnorm_fused.backends.cuda import module_geometry
    from acnorm_fused.backends.geometry import geometry

    geo = module_geometry(emulated_cuda_module, geometry(torch.zeros(2, 3, 4)))
    fields = dict(geometry=geo, dtype=0, activation=0, slope=0.0, count=8.0, momentum=0.19, eps=1e-5,
                  temperature=1.0, batch_stats=True, update_running=True, pilot_stride=4, fwd_partials=0,
                  fwd_mean=6, fwd_invstd=9, fwd_aux=12, fwd_weight=36, bwd_partials=18, bwd_grad_affine=6,
                  bwd_coef=12, bwd_grad_target=0,
                  fwd_resident=emulated_cuda_module.Resident(packs=0, lanes_c=1, tiles=1, blocks=1, vector=False),
                  bwd_resident=emulated_cuda_module.Resident(packs=2, lanes_c=1, tiles=1, blocks=1, vector=True))
    emulated_cuda_module.StepPlan(**fields)
    with pytest.raises(TypeError):
        emulated_cuda_module.StepPlan(*fields.values())
    with pytest.raises(ValueError, match="dtype code must be 0, 1 or 2"):
        emulated_cuda_module.StepPlan(**{**fields, "dtype": 7})
