"""The kernel backends (triton, cuda) against the float64 reference.

On a machine without a GPU the Triton kernels run in triton's interpreter on
CPU tensors (``TRITON_INTERPRET=1``, set by conftest), and the CUDA kernels
run in the host emulator, built from the same sources in csrc/; with a GPU
the same tests run the compiled kernels on CUDA tensors. The ``tiles``
fixture can shrink the tiles so that tiny inputs still take several loop
steps and several partial results per channel, as large inputs do (both
stand-ins run the programs of a launch one after the other, so small tiles
cost test time).
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

import acnorm_fused as acn
from acnorm_fused import backends
from acnorm_fused.backends import geometry as launch
from acnorm_fused.backends import resolve_backend
from acnorm_fused.correlation import effective_affine
from acnorm_fused.functional import effective_momentum

from helpers import assert_close, make_affines, make_layer, random_input

pytestmark = pytest.mark.interpret

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LAYER_CLASSES = {2: acn.ACNorm1d, 3: acn.ACNorm1d, 4: acn.ACNorm2d, 5: acn.ACNorm3d}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


@pytest.fixture
def backend(kernel_backend):
    """The kernel backend under test (see conftest.kernel_backend)."""
    return kernel_backend


def _use_small_tiles(monkeypatch) -> None:
    """Tiles of 32 elements over a machine of 8 multiprocessors."""
    monkeypatch.setattr(launch, "_TILE", 32)
    monkeypatch.setattr(launch, "_worker_count", lambda device: 8)


@pytest.fixture(params=["one_tile", "small_tiles"])
def tiles(request, monkeypatch):
    """Default tiles, then small ones."""
    if request.param == "small_tiles":
        _use_small_tiles(monkeypatch)
    return request.param


def _run(layer, backend, inputs, grads, dtype, memory_format, device):
    """Train a copy of ``layer`` on ``inputs`` (one step each), then run it in eval
    on the first input; return outputs, input and target gradients, the final
    running statistics and the eval output and its input gradient."""
    model = copy.deepcopy(layer).to(device)
    model.backend = backend
    steps = []
    for x, g in zip(inputs, grads):
        xi = x.to(device, dtype, copy=True).contiguous(memory_format=memory_format).requires_grad_()
        out = model(xi)
        assert out.dtype == dtype
        assert out.is_contiguous(memory_format=memory_format)
        out.backward(g.to(device, dtype).contiguous(memory_format=memory_format))
        steps.append((out.detach(), xi.grad, model.weight_target.grad.clone(), model.bias_target.grad.clone()))
        model.zero_grad()
    model.eval()
    xe = inputs[0].to(device, dtype, copy=True).contiguous(memory_format=memory_format).requires_grad_()
    eval_out = model(xe)
    eval_out.backward(grads[0].to(device, dtype).contiguous(memory_format=memory_format))
    running = (model.running_mean.clone(), model.running_var.clone()) if model.running_mean is not None else ()
    return steps, running, (eval_out.detach(), xe.grad)


def _compare(backend, layer, shape, dtype, memory_format=torch.contiguous_format, steps=2, mean=0.0, std=1.0):
    inputs = [random_input(shape, 10 + k, dtype, mean=mean + k, std=std).double() for k in range(steps)]
    grads = [random_input(shape, 20 + k, dtype).double() for k in range(steps)]
    got = _run(layer, backend, inputs, grads, dtype, memory_format, DEVICE)
    expected = _run(copy.deepcopy(layer).double(), "reference", inputs, grads, torch.float64,
                    torch.contiguous_format, "cpu")
    for got_step, expected_step in zip(got[0], expected[0]):
        out, grad_x, grad_w, grad_b = (t.cpu() for t in got_step)
        assert_close(out, expected_step[0], dtype)
        assert_close(grad_x, expected_step[1], dtype, 10)
        # Sums over the whole batch: their error grows with the count.
        assert_close(grad_w, expected_step[2], torch.float32 if dtype == torch.float32 else dtype, 100)
        assert_close(grad_b, expected_step[3], torch.float32 if dtype == torch.float32 else dtype, 100)
    for got_stat, expected_stat in zip(got[1], expected[1]):
        assert_close(got_stat.cpu(), expected_stat, torch.float32, 10 if dtype == torch.float32 else 1000)
    assert_close(got[2][0].cpu(), expected[2][0], dtype)
    assert_close(got[2][1].cpu(), expected[2][1], dtype, 10)


# Sizes that are multiples of no block, one value per channel and sample, and
# (with small tiles) inputs that span several tiles and partial results.
SHAPES = [(6, 3), (5, 4, 1), (2, 4, 7), (3, 5, 9, 7), (2, 3, 5, 6, 7), (1, 2, 3, 1, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu"])
def test_matches_reference_over_shapes(backend, shape, activation):
    layer = make_layer(LAYER_CLASSES[len(shape)], shape[1], seed=len(shape), activation=activation,
                       negative_slope=0.2)
    _compare(backend, layer, shape, torch.float32)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_with_small_tiles(backend, shape, monkeypatch):
    _use_small_tiles(monkeypatch)
    layer = make_layer(LAYER_CLASSES[len(shape)], shape[1], seed=len(shape), activation="leaky_relu")
    _compare(backend, layer, shape, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (2, 3, 4, 5, 6)], ids=["4d", "5d"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_reference_over_dtypes_and_layouts(backend, dtype, shape, layout, monkeypatch):
    if dtype == torch.bfloat16 and len(shape) == 5:
        _use_small_tiles(monkeypatch)
    memory_format = CHANNELS_LAST[len(shape)] if layout == "channels_last" else torch.contiguous_format
    layer = make_layer(LAYER_CLASSES[len(shape)], shape[1], seed=3, activation="relu")
    _compare(backend, layer, shape, dtype, memory_format)


def test_more_channels_than_one_block(backend):
    """70 channels, channels-last: several channel blocks in the interleaved
    kernels and several finalise programs. (Planar programs each take one
    channel whatever the count.)"""
    layer = make_layer(acn.ACNorm2d, 70, seed=4, activation="leaky_relu")
    _compare(backend, layer, (2, 70, 3, 4), torch.float32, torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_in_whole_packs(backend, dtype, tiles):
    """72 channels, channels-last: a multiple of every 16-byte pack width, so
    the interleaved kernels take their vector paths, over two channel blocks
    (the second a partial one)."""
    layer = make_layer(acn.ACNorm2d, 72, seed=4, activation="relu")
    _compare(backend, layer, (2, 72, 3, 5), dtype, torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 2, 10, 12, 20), (2, 2, 9, 11, 21)], ids=["whole_packs", "odd"])
def test_long_rows(backend, dtype, shape):
    """Rows of 2400 and 2079 positions: the planar elementwise passes give a
    thread several packs (or scalars) of a row, the last block partly empty."""
    layer = make_layer(acn.ACNorm3d, 2, seed=26, activation="leaky_relu")
    _compare(backend, layer, shape, dtype, steps=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_input(backend, dtype):
    """A contiguous input whose data starts one element past a 16-byte boundary:
    the kernels must not assume aligned pointers (16-byte accesses) for it."""
    layer = make_layer(acn.ACNorm3d, 2, seed=27, activation="relu")
    shape = (2, 2, 4, 4, 8)
    base = random_input((2 * 2 * 4 * 4 * 8 + 1,), 28).to(DEVICE, dtype)
    x = base[1:].view(shape)
    assert x.data_ptr() % 16 != 0 and x.is_contiguous()
    grad = random_input(shape, 29).to(DEVICE, dtype)
    model = copy.deepcopy(layer).to(DEVICE)
    model.backend = backend
    xi = x.detach().requires_grad_()
    out = model(xi)
    out.backward(grad)
    reference = copy.deepcopy(layer).double()
    reference.backend = "reference"
    xr = x.detach().cpu().double().requires_grad_()
    expected = reference(xr)
    expected.backward(grad.cpu().double())
    assert_close(out.cpu(), expected, dtype)
    assert_close(xi.grad.cpu(), xr.grad, dtype, 10)


def test_large_mean_small_spread(backend):
    """CT-like intensities: mean 1e3, std 1e-2. A sum of squares loses the
    variance entirely in fp32; the merged Welford partials keep it."""
    layer = make_layer(acn.ACNorm3d, 3, seed=5)
    _compare(backend, layer, (2, 3, 5, 6, 7), torch.float32, mean=1e3, std=1e-2, steps=1)


def test_large_mean_small_spread_statistics(backend, tiles):
    x = random_input((3, 2, 9, 11), 6, mean=1e3, std=1e-2)
    layer = make_layer(acn.ACNorm2d, 2, seed=6, backend=backend).to(DEVICE)
    before = layer.running_var.clone()
    layer(x.to(DEVICE))
    batch_var = x.double().var((0, 2, 3), unbiased=True)
    m = effective_momentum(0.1)
    expected = (1 - m) * before.double().cpu() + m * batch_var
    torch.testing.assert_close(layer.running_var.double().cpu(), expected, rtol=1e-4, atol=0)


def test_constant_channel(backend, tiles):
    """A channel with zero variance normalises to zero: its output is the shift B."""
    x = random_input((2, 3, 4, 5, 6), 7)
    x[:, 1] = 3.25
    layer = make_layer(acn.ACNorm3d, 3, seed=7)
    _compare(backend, layer, tuple(x.shape), torch.float32, steps=1)
    model = copy.deepcopy(layer).to(DEVICE)
    model.backend = backend
    out = model(x.to(DEVICE)).cpu()
    _, b_eff = effective_affine(layer.weight, layer.bias, layer.weight_target, layer.bias_target)
    torch.testing.assert_close(out[:, 1], torch.full_like(out[:, 1], float(b_eff[1].detach())), rtol=1e-6, atol=1e-6)


def test_correlation_with_ties_matches_correlation_module(backend):
    """S from the kernels equals :func:`acnorm_fused.correlation.correlation`, ties
    kept: duplicate source signatures, and a target signature equidistant from
    two source signatures."""
    weight = torch.tensor([1.0, 1.0, 1.0, 2.0, 1.0])
    bias = torch.tensor([0.5, 0.5, 1.5, -1.0, 3.0])  # signatures 0.5, 0.5, 1.5, -0.5, 3.0
    weight_target = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    bias_target = torch.tensor([1.0, 0.5, 0.0, 1.0, 2.0])  # 1.0 sits between 0.5 and 1.5
    eps = 1e-5
    layer = acn.ACNorm1d(5, eps=eps, backend=backend).to(DEVICE)
    with torch.no_grad():
        for name, value in zip(("weight", "bias", "weight_target", "bias_target"),
                               (weight, bias, weight_target, bias_target)):
            getattr(layer, name).copy_(value)
        # Running statistics that make the eval normalisation the identity.
        layer.running_mean.zero_()
        layer.running_var.fill_(1.0 - eps)
    layer.eval()
    w_eff, b_eff = effective_affine(weight, bias, weight_target, bias_target, eps)
    out = layer(torch.stack((torch.zeros(5), torch.ones(5))).to(DEVICE)).cpu()
    torch.testing.assert_close(out[0], b_eff, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1] - out[0], w_eff, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_effective_affine_over_many_channels(backend, temperature):
    """More channels than one correlation tile (64), several finalise programs."""
    channels = 150
    weight, bias, weight_target, bias_target = make_affines(channels, 8, spread=0.05)
    layer = acn.ACNorm1d(channels, temperature=temperature, backend=backend).to(DEVICE)
    with torch.no_grad():
        for name, value in zip(("weight", "bias", "weight_target", "bias_target"),
                               (weight, bias, weight_target, bias_target)):
            getattr(layer, name).copy_(value)
        layer.running_mean.zero_()
        layer.running_var.fill_(1.0 - layer.eps)
    layer.eval()
    x = torch.stack((torch.zeros(channels), torch.ones(channels))).to(DEVICE).requires_grad_()
    out = layer(x)
    g = random_input(out.shape, 9)
    out.backward(g.to(DEVICE))
    w = weight_target.clone().requires_grad_()
    b = bias_target.clone().requires_grad_()
    w_eff, b_eff = effective_affine(weight, bias, w, b, layer.eps, temperature)
    torch.testing.assert_close(out.detach().cpu()[0], b_eff.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((out[1] - out[0]).detach().cpu(), w_eff.detach(), rtol=1e-5, atol=1e-6)
    ((x.detach().cpu() * w_eff + b_eff) * g).sum().backward()
    torch.testing.assert_close(layer.weight_target.grad.cpu(), w.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias_target.grad.cpu(), b.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("double_update,momentum", [(True, 0.1), (False, 0.3), (True, None)])
def test_running_statistics_options(backend, double_update, momentum):
    layer = make_layer(acn.ACNorm2d, 3, seed=9, momentum=momentum, double_update=double_update)
    _compare(backend, layer, (2, 3, 5, 4), torch.float32, steps=3)


def test_without_running_statistics(backend):
    """track_running_stats=False: batch statistics in eval too."""
    layer = make_layer(acn.ACNorm3d, 3, seed=10, track_running_stats=False)
    _compare(backend, layer, (2, 3, 3, 4, 5), torch.float32)


def test_non_contiguous_input_and_gradient_layouts(backend):
    layer = make_layer(acn.ACNorm2d, 3, seed=11, backend=backend).to(DEVICE)
    reference = copy.deepcopy(layer).double().cpu()
    reference.backend = "reference"
    base = random_input((2, 6, 5, 9), 12)
    g = random_input((2, 3, 5, 7), 13).contiguous(memory_format=torch.channels_last)
    grads = []
    for model, dtype, device in ((layer, torch.float32, DEVICE), (reference, torch.float64, "cpu")):
        leaf = base.to(device, dtype, copy=True).requires_grad_()
        x = leaf[:, ::2, :, 1:8]  # strided: neither contiguous nor channels-last
        out = model(x)
        out.backward(g.to(device, dtype))  # a gradient in another layout than the output
        grads.append((out.detach().cpu(), leaf.grad.cpu()))
    assert_close(grads[0][0], grads[1][0], torch.float32)
    assert_close(grads[0][1], grads[1][1], torch.float32, 10)


def test_expanded_output_gradient(backend):
    """``out.sum().backward()`` hands the backward a stride-0 gradient."""
    layer = make_layer(acn.ACNorm3d, 2, seed=14, activation="relu")
    x = random_input((2, 2, 3, 4, 5), 15)
    grads = {}
    for name, dtype, device in ((backend, torch.float32, DEVICE), ("reference", torch.float64, "cpu")):
        model = copy.deepcopy(layer).to(device, dtype)
        model.backend = name
        xi = x.to(device, dtype, copy=True).requires_grad_()
        model(xi).sum().backward()
        grads[name] = (xi.grad.cpu(), model.weight_target.grad.cpu())
    assert_close(grads[backend][0], grads["reference"][0], torch.float32, 10)
    assert_close(grads[backend][1], grads["reference"][1], torch.float32, 10)


def test_deterministic(backend, tiles):
    layer = make_layer(acn.ACNorm3d, 3, seed=16, backend=backend).to(DEVICE)
    x = random_input((2, 3, 4, 6, 5), 17).to(DEVICE)
    results = []
    for _ in range(2):
        model = copy.deepcopy(layer)
        xi = x.clone().requires_grad_()
        out = model(xi)
        out.backward(torch.ones_like(out) * torch.arange(out.numel(), device=DEVICE).view_as(out).sin())
        results.append((out, xi.grad, model.weight_target.grad, model.running_var))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_auto_picks_kernels_only_for_cuda_tensors():
    x = torch.zeros(2, 3, 4)
    assert resolve_backend("auto", x, "test") == "torch"
    if torch.cuda.is_available():
        compiled = backends.cuda_extension() is not None
        assert resolve_backend("auto", x.cuda(), "test") == ("cuda" if compiled else "triton")
        assert resolve_backend("auto", x.cuda().double(), "test") == "torch"


def test_auto_never_picks_the_emulation(cuda_kernels):
    assert resolve_backend("auto", torch.zeros(2, 3, 4), "test") == "torch"


def test_refuses_float64(backend):
    layer = make_layer(acn.ACNorm2d, 3, seed=18, dtype=torch.float64, backend=backend).to(DEVICE)
    with pytest.raises(TypeError, match=rf"ACNorm2d\(3\): backend '{backend}' runs float32, float16 and bfloat16"):
        layer(random_input((2, 3, 4, 4), 19, torch.float64).to(DEVICE))


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_compiled_kernels_refuse_cpu_tensors(name, monkeypatch):
    """Outside triton's interpreter and the host emulation, CPU input is a clear error."""
    if name == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    else:
        monkeypatch.setattr(backends, "_load_cuda_extension", lambda: (types.SimpleNamespace(emulated=False), ""))
    layer = make_layer(acn.ACNorm2d, 3, seed=20, backend=name)
    running_mean = layer.running_mean.clone()
    with pytest.raises(RuntimeError, match=rf"ACNorm2d\(3\): backend '{name}' runs CUDA tensors"):
        layer(random_input((2, 3, 4, 4), 21))
    assert torch.equal(layer.running_mean, running_mean)
    assert int(layer.num_batches_tracked) == 0


def test_cuda_without_the_compiled_module_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backends, "_load_cuda_extension", lambda: (None, "No module named 'acnorm_fused._cuda'"))
    layer = make_layer(acn.ACNorm2d, 3, seed=20, backend="cuda")
    with pytest.raises(RuntimeError, match=r"ACNorm2d\(3\): backend 'cuda' needs the compiled extension"):
        layer(random_input((2, 3, 4, 4), 21))
    assert "cuda" not in acn.available_backends()


def test_opcheck(backend):
    channels = 3
    w, b, wt, bt = (t.to(DEVICE) for t in make_affines(channels, 22))
    wt.requires_grad_(True)
    bt.requires_grad_(True)
    x = random_input((2, channels, 3, 5), 23).to(DEVICE).requires_grad_()
    rm = torch.zeros(channels, device=DEVICE)
    rv = torch.ones(channels, device=DEVICE)
    args = (x, w, b, wt, bt, rm, rv, True, 0.19, 1e-5, 0.7, "leaky_relu", 0.1, backend, "test")
    torch.library.opcheck(torch.ops.acnorm_fused.ac_norm_fwd.default, args)


def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    layer = make_layer(acn.ACNorm3d, 3, seed=24, backend=backend, activation="relu").to(DEVICE)
    compiled_layer = copy.deepcopy(layer)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    x = random_input((2, 3, 4, 3, 5), 25).to(DEVICE)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_e, out_c = layer(xe), compiled(xc)
    torch.testing.assert_close(out_c, out_e)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(compiled_layer.weight_target.grad, layer.weight_target.grad)
    torch.testing.assert_close(compiled_layer.running_mean, layer.running_mean)


def test_fused_backends_share_one_contract():
    """Every function of the fused-backend contract, with the same parameters."""
    import inspect

    from acnorm_fused.backends import fused_backend
    from acnorm_fused.backends.multipass import CONTRACT

    torch_backend = fused_backend("torch")
    for name in CONTRACT:
        expected = list(inspect.signature(getattr(torch_backend, name)).parameters)
        for kernels in ("triton", "cuda"):
            assert list(inspect.signature(getattr(fused_backend(kernels), name)).parameters) == expected, name
