"""AC-Norm on a CUDA device against the float64 reference on the CPU (skipped without a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

import acnorm_fused as acn
from acnorm_fused import benchmark
from acnorm_fused.correlation import effective_affine
from acnorm_fused.functional import effective_momentum

from conftest import assert_close, make_layer, random_input

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_cuda_training_step_matches_reference(backend, dtype, memory_format):
    layer = make_layer(acn.ACNorm3d, 8, seed=1, backend=backend, activation="relu")
    reference = copy.deepcopy(layer).double()
    reference.backend = "reference"
    gpu = copy.deepcopy(layer).cuda()
    x = random_input((2, 8, 6, 7, 9), 2, torch.float64)
    grad = random_input(x.shape, 3, torch.float64)

    xg = x.to("cuda", dtype).contiguous(memory_format=memory_format).requires_grad_()
    out = gpu(xg)
    out.backward(grad.to("cuda", dtype).contiguous(memory_format=memory_format))
    assert out.is_contiguous(memory_format=memory_format)

    xr = x.clone().requires_grad_()
    expected = reference(xr)
    expected.backward(grad)

    assert_close(out.cpu(), expected, dtype)
    assert_close(xg.grad.cpu(), xr.grad, dtype, 10)
    assert_close(gpu.weight_target.grad.cpu(), reference.weight_target.grad, dtype, 100)
    assert_close(gpu.running_var.cpu(), reference.running_var, torch.float32)
    gpu.eval()
    reference.eval()
    assert_close(gpu(xg.detach()).cpu(), reference(x), dtype)


def test_cuda_compile_fullgraph():
    layer = make_layer(acn.ACNorm3d, 4, seed=4).cuda()
    compiled = torch.compile(copy.deepcopy(layer), fullgraph=True)
    x = random_input((2, 4, 8, 8, 8), 5).cuda().requires_grad_()
    assert_close(compiled(x), layer(x), torch.float32)


def _assert_relative(actual, expected, rel):
    """Max abs error at most ``rel`` times the largest magnitude of ``expected``."""
    actual, expected = actual.double(), expected.double()
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= rel * max(scale, 1e-12), f"max error {error:.3e} against magnitude {scale:.3e}"


BENCH_CASES = [(shape, torch.contiguous_format) for shape in benchmark.GPU_SHAPES] + [
    (shape, torch.channels_last_3d) for shape in benchmark.GPU_CHANNELS_LAST_SHAPES
]


@pytest.mark.parametrize("shape,memory_format", BENCH_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{str(f).split('.')[-1]}" for s, f in BENCH_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_benchmark_shapes_matches_reference(shape, memory_format, dtype):
    """The shapes of the benchmark table: the fused step against the float64 reference on the GPU."""
    layer = make_layer(acn.ACNorm3d, shape[1], seed=30, backend="triton", activation="relu").cuda()
    reference = copy.deepcopy(layer).double()
    reference.backend = "reference"
    generator = torch.Generator(device="cuda").manual_seed(31)
    x = (2.0 + torch.randn(shape, generator=generator, device="cuda")).to(dtype)
    grad = torch.randn(shape, generator=generator, device="cuda").to(dtype)
    x = x.contiguous(memory_format=memory_format)
    grad = grad.contiguous(memory_format=memory_format)

    xt = x.detach().requires_grad_()
    out = layer(xt)
    out.backward(grad)
    assert out.is_contiguous(memory_format=memory_format)
    xr = x.detach().double().requires_grad_()
    expected = reference(xr)
    expected.backward(grad.double())

    rel = 1e-5 if dtype == torch.float32 else 1e-2
    _assert_relative(out, expected, rel)
    del out, expected
    _assert_relative(xt.grad, xr.grad, 10 * rel)
    _assert_relative(layer.weight_target.grad, reference.weight_target.grad, 1e-4)
    _assert_relative(layer.bias_target.grad, reference.bias_target.grad, 1e-4)
    _assert_relative(layer.running_mean, reference.running_mean, 1e-5)
    _assert_relative(layer.running_var, reference.running_var, 1e-5)


@pytest.mark.slow
def test_triton_indexes_past_two_to_the_31():
    """A bf16 input of more than 2^31 elements: the second channel ends past
    element 2^31, so 32-bit offsets would wrap."""
    shape = (1, 2, 1024, 1024, 1025)
    layer = make_layer(acn.ACNorm3d, 2, seed=32, backend="triton").cuda()
    generator = torch.Generator(device="cuda").manual_seed(33)
    x = torch.randn(shape, generator=generator, device="cuda", dtype=torch.bfloat16)
    x[:, 1] = x[:, 1] * 0.5 + 5.0
    before = layer.running_mean.double()
    out = layer(x)
    channel = x[0, 1]
    mean = channel.sum(dtype=torch.float64) / channel.numel()
    var = (channel.float() - mean.float()).square().sum(dtype=torch.float64) / channel.numel()
    m = effective_momentum(0.1)
    torch.testing.assert_close(layer.running_mean.double()[1], (1 - m) * before[1] + m * mean,
                               rtol=1e-5, atol=1e-5)
    w_eff, b_eff = effective_affine(layer.weight, layer.bias, layer.weight_target, layer.bias_target)
    tail = channel[-2:].double()
    expected = (tail - mean) * torch.rsqrt(var + layer.eps) * w_eff[1].double() + b_eff[1].double()
    _assert_relative(out[0, 1, -2:], expected.detach(), 2e-2)
