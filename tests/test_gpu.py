"""AC-Norm on a CUDA device against the float64 reference on the CPU (skipped without a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

import acnorm_fused as acn

from conftest import assert_close, make_layer, random_input

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["auto", "torch"])
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
