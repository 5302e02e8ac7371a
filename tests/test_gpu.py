"""AC-Norm on a CUDA device against the float64 reference (skipped without a GPU).

The kernel backends (triton, and cuda when acnorm_fused._cuda is built) run
the shapes of the benchmark table; the compiled CUDA module is also checked
on a non-default stream, on a second GPU when there is one, and under CUDA
graph capture."""

from __future__ import annotations

import copy

import pytest
import torch

import acnorm_fused as acn
from acnorm_fused.bench.cases import GPU_CHANNELS_LAST_SHAPES, GPU_SHAPES
from acnorm_fused.bench.layer import fused_passes
from acnorm_fused.correlation import effective_affine
from acnorm_fused.functional import effective_momentum

from helpers import assert_close, make_layer, random_input

pytestmark = pytest.mark.gpu


KERNEL_BACKENDS = ["triton", "cuda"]


@pytest.fixture
def kernels(request):
    """Makes sure the kernel backend named by the test's ``backend`` can run."""
    if request.getfixturevalue("backend") == "cuda":
        request.getfixturevalue("cuda_kernels")


@pytest.mark.parametrize("backend", ["auto", "torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_cuda_training_step_matches_reference(backend, dtype, memory_format, kernels):
    layer = make_layer(acn.ACNorm3d, 8, seed=1, backend=backend, activation="relu")
    reference = copy.deepcopy(layer).double()
    reference.backend = "reference"
    gpu = copy.deepcopy(layer).cuda()
    x = random_input((2, 8, 6, 7, 9), 2, torch.float64)
    grad = random_input(x.shape, 3, torch.float64)

    # The reference sees the same (rounded) values as the GPU.
    x, grad = x.to(dtype).double(), grad.to(dtype).double()
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


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_non_finite_parameters_are_reported_by_a_later_call(backend, kernels):
    """On a GPU the finite check is read without waiting: a later call raises,
    naming the layer and the parameter."""
    layer = make_layer(acn.ACNorm3d, 4, seed=50, backend=backend).cuda()
    x = random_input((2, 4, 3, 3, 3), 51).cuda()
    layer(x)
    with torch.no_grad():
        layer.weight_target[1] = float("nan")
    assert torch.isnan(layer(x)).any()  # the call that sees them returns
    torch.cuda.synchronize()
    with torch.no_grad():
        layer.weight_target[1] = 1.0
    with pytest.raises(ValueError, match=r"ACNorm3d\(4\): weight_target contain.*later call"):
        layer(x)
    layer(x)  # reported once; finite parameters pass again


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


def _grad_off_disputed_branches(out, expected, grad):
    """``grad`` with zeros where ``out`` and ``expected`` (outputs of a
    ReLU-like activation) took different branches.

    Where the pre-activation is within rounding of 0, two correct
    implementations can disagree on its sign; the outputs then agree to that
    rounding, but the input gradients differ by the whole ``scale * dy``. On
    tens of millions of values a few such positions are expected; they are
    few or a kernel is wrong."""
    disputed = (out > 0) != (expected > 0)
    assert disputed.sum().item() <= max(8, out.numel() // 1_000_000), "activation branches disagree widely"
    return grad.masked_fill(disputed, 0)


BENCH_CASES = [(shape, torch.contiguous_format) for shape in GPU_SHAPES] + [
    (shape, torch.channels_last_3d) for shape in GPU_CHANNELS_LAST_SHAPES
]


@pytest.mark.xdist_group("gpu_memory")
@pytest.mark.parametrize("shape,memory_format", BENCH_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{str(f).split('.')[-1]}" for s, f in BENCH_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_on_benchmark_shapes_match_reference(shape, memory_format, dtype, backend, kernels):
    """The shapes of the benchmark table: the fused step against the float64 reference on the GPU."""
    layer = make_layer(acn.ACNorm3d, shape[1], seed=30, backend=backend, activation="relu").cuda()
    reference = copy.deepcopy(layer).double()
    reference.backend = "reference"
    generator = torch.Generator(device="cuda").manual_seed(31)
    x = (2.0 + torch.randn(shape, generator=generator, device="cuda")).to(dtype)
    grad = torch.randn(shape, generator=generator, device="cuda").to(dtype)
    x = x.contiguous(memory_format=memory_format)
    grad = grad.contiguous(memory_format=memory_format)

    xt = x.detach().requires_grad_()
    out = layer(xt)
    assert out.is_contiguous(memory_format=memory_format)
    xr = x.detach().double().requires_grad_()
    expected = reference(xr)
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    _assert_relative(out, expected, rel)
    grad = _grad_off_disputed_branches(out, expected, grad)
    out.backward(grad)
    expected.backward(grad.double())
    del out, expected
    _assert_relative(xt.grad, xr.grad, 10 * rel)
    _assert_relative(layer.weight_target.grad, reference.weight_target.grad, 1e-4)
    _assert_relative(layer.bias_target.grad, reference.bias_target.grad, 1e-4)
    _assert_relative(layer.running_mean, reference.running_mean, 1e-5)
    _assert_relative(layer.running_var, reference.running_var, 1e-5)


@pytest.mark.slow
@pytest.mark.xdist_group("gpu_memory")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_index_past_two_to_the_31(backend, kernels):
    """A bf16 input of more than 2^31 elements: the second channel ends past
    element 2^31, so 32-bit offsets would wrap."""
    shape = (1, 2, 1024, 1024, 1025)
    layer = make_layer(acn.ACNorm3d, 2, seed=32, backend=backend).cuda()
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


def _train_step(layer, x, grad):
    """Output, input gradient and target-weight gradient of one training step."""
    xi = x.detach().requires_grad_()
    out = layer(xi)
    out.backward(grad)
    return out.detach(), xi.grad, layer.weight_target.grad.clone()


def _forward(layer, x):
    """The layer's output on a fresh leaf copy of ``x`` (and that leaf)."""
    xi = x.detach().requires_grad_()
    return layer(xi), xi


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_triton(memory_format, dtype, cuda_kernels):
    """The two kernel backends agree with each other far closer than with the
    dtype's tolerance: same algorithm, fp32 accumulation in both."""
    shape = (2, 64, 24, 20, 18)
    generator = torch.Generator(device="cuda").manual_seed(40)
    x = (3.0 + torch.randn(shape, generator=generator, device="cuda")).to(dtype)
    x = x.contiguous(memory_format=memory_format)
    grad = torch.randn(shape, generator=generator, device="cuda").to(dtype).contiguous(memory_format=memory_format)
    layers = {backend: make_layer(acn.ACNorm3d, shape[1], seed=41, backend=backend,
                                  activation="leaky_relu").cuda() for backend in KERNEL_BACKENDS}
    steps = {backend: _forward(layer, x) for backend, layer in layers.items()}
    grad = _grad_off_disputed_branches(steps["cuda"][0], steps["triton"][0], grad)
    results = {}
    for backend, (out, xi) in steps.items():
        out.backward(grad)
        results[backend] = (out.detach(), xi.grad, layers[backend].weight_target.grad, layers[backend].running_var)
    for got, expected in zip(results["cuda"], results["triton"]):
        _assert_relative(got, expected, 1e-5 if dtype == torch.float32 else 1e-2)


def test_cuda_on_a_non_default_stream(cuda_kernels):
    """Work queued on a side stream stays ordered with the kernels: the result
    matches the same step on the default stream."""
    layer = make_layer(acn.ACNorm3d, 16, seed=42, backend="cuda").cuda()
    x = random_input((2, 16, 20, 20, 20), 43).cuda()
    grad = random_input(x.shape, 44).cuda()
    default_layer = copy.deepcopy(layer)
    # Two steps each: the second runs the plan (the single pass's cooperative launches).
    for _ in range(2):
        expected = _train_step(default_layer, x, grad)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x_side = x * 1.0  # produced on the side stream, consumed there at once
        for _ in range(2):
            got = _train_step(layer, x_side, grad)
    torch.cuda.current_stream().wait_stream(side)
    assert fused_passes(layer)[0] == "single"
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_cuda_on_a_second_device(cuda_kernels):
    """A tensor on cuda:1 while cuda:0 is current: launches go to its device,
    and the caller's current device is left as it was."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    layer = make_layer(acn.ACNorm3d, 8, seed=45, backend="cuda")
    x = random_input((2, 8, 6, 7, 9), 46)
    grad = random_input(x.shape, 47)
    expected = _train_step(copy.deepcopy(layer).cuda(0), x.cuda(0), grad.cuda(0))
    torch.cuda.set_device(0)
    got = _train_step(layer.cuda(1), x.cuda(1), grad.cuda(1))
    assert torch.cuda.current_device() == 0
    assert got[0].device == torch.device("cuda", 1)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.cpu(), b.cpu())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_under_cuda_graph_capture(backend, kernels):
    """A captured training step replays to the eager step's results."""
    layer = make_layer(acn.ACNorm3d, 16, seed=48, backend=backend, activation="relu").cuda()
    eager = copy.deepcopy(layer)
    x = random_input((2, 16, 12, 12, 12), 49).cuda()
    grad = random_input(x.shape, 50).cuda()
    static_x = x.clone().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
        layer(static_x).backward(grad)
    torch.cuda.current_stream().wait_stream(side)
    warm = copy.deepcopy(layer)
    static_x.grad = None
    layer.weight_target.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
        static_out.backward(grad)
    graph.replay()
    torch.cuda.synchronize()
    if backend == "cuda":
        assert fused_passes(layer)[0] == "single", "the captured step is the single pass's two launches"
    expected = _train_step(eager, x, grad)
    _, _, _ = _train_step(warm, x, grad)  # the warm-up step moved the running statistics once
    torch.testing.assert_close(static_out, expected[0])
    torch.testing.assert_close(static_x.grad, expected[1])
    torch.testing.assert_close(layer.running_mean, warm.running_mean)


@pytest.mark.xdist_group("gpu_memory")
@pytest.mark.parametrize("shape,dtype", [((2, 320, 8, 8, 8), torch.float32), ((2, 256, 16, 16, 16), torch.bfloat16),
                                         ((2, 256, 16, 16, 16), torch.float32)], ids=str)
def test_cuda_single_pass_on_the_deep_stages(shape, dtype, cuda_kernels):
    """The deep stages of a 3D U-Net fit the GPU: a planned training step is the
    single pass forward and backward (as the registers the variants take on
    sm_90 predict for an H100 or H200), equal to the multi-pass step within
    BatchNorm's tolerance."""
    from acnorm_fused.backends import cuda as cuda_backend

    if torch.cuda.get_device_properties(0).multi_processor_count < 132:
        pytest.skip("the prediction is for 132 multiprocessors (H100 SXM, H200)")
    layer = make_layer(acn.ACNorm3d, shape[1], seed=51, backend="cuda", activation="relu").cuda()
    multi = copy.deepcopy(layer)
    x = random_input(shape, 52).cuda().to(dtype)
    grad = random_input(shape, 53).cuda().to(dtype)
    for _ in range(2):  # the second step runs the plan
        got = _train_step(layer, x, grad)
    assert fused_passes(layer)[0] == "single", [cuda_backend.resident_capacity.cache_info()]
    original = cuda_backend.resident_capacity
    cuda_backend.resident_capacity = lambda *args: 0
    try:
        for _ in range(2):
            expected = _train_step(multi, x, grad)
    finally:
        cuda_backend.resident_capacity = original
    assert fused_passes(multi)[0] == "multi"
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(got, expected):
        _assert_relative(a.float(), b.float(), 10 * rel)


def test_compiled_module_holds_this_gpus_code(cuda_kernels):
    major, minor = torch.cuda.get_device_capability()
    archs = cuda_kernels.compiled_archs()
    assert archs, "the compiled module lists no architecture"
    assert 10 * major + minor in archs or max(archs) < 10 * major + minor, (
        f"built for {archs}, the GPU is sm_{major}{minor}")
