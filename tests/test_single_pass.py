"""The CUDA backend's single-pass kernels (csrc/acnorm/resident.cu) against the
float64 reference, on either side of the GPU's capacity.

A planned layer runs them when the GPU holds its grid: here the host
emulator, whose cooperative launches run every block at once and hold
``emulator::kResidentBlocks`` blocks; ``resident_capacity`` is replaced to put
a layer on either side of that threshold. With a GPU the same tests run the
compiled kernels and its own capacity.
"""

from __future__ import annotations

import copy

import pytest
import torch

import acnorm_fused as acn
from acnorm_fused.backends import cuda as cuda_backend
from acnorm_fused.backends import geometry as launch
from acnorm_fused.bench.layer import fused_passes

from helpers import assert_close, make_layer, random_input

pytestmark = pytest.mark.interpret

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
LAYERS = {4: acn.ACNorm2d, 5: acn.ACNorm3d}


@pytest.fixture
def module(cuda_kernels):
    return cuda_kernels


def _plan(layer):
    (plan,) = [p for key, p in layer._plans.items() if key[-1] == layer.training]
    return plan


def _passes(layer) -> tuple[int, int]:
    """Packs per lane of the layer's single-pass forward and backward (0: multi-pass)."""
    fwd, bwd = _plan(layer).launches.resident
    return (fwd.packs if fwd else 0, bwd.packs if bwd else 0)


def _steps(layer, inputs, grads, dtype, memory_format, steps, device=DEVICE):
    """Train a copy of ``layer`` for ``steps`` steps (the first takes the general
    path and builds the plan), then the remaining inputs in eval; return every
    step's output, input gradient and target gradients, and the final state."""
    model = copy.deepcopy(layer).to(device)
    results = []
    for step, (x, grad) in enumerate(zip(inputs, grads)):
        model.train(step < steps)
        x = x.to(device, dtype).contiguous(memory_format=memory_format).requires_grad_()
        out = model(x)
        out.backward(grad.to(device, dtype).contiguous(memory_format=memory_format))
        results.append((out.detach().cpu(), x.grad.cpu(), model.weight_target.grad.cpu().clone(),
                        model.bias_target.grad.cpu().clone()))
        model.zero_grad()
    return model, results, {k: v.cpu() for k, v in model.state_dict().items()}


def _compare(layer, shape, dtype=torch.float32, layout="contiguous", steps=3, eval_steps=2, mean=0.0, std=1.0):
    """The cuda layer's steps against the reference's on the same values (rounded
    to ``dtype``); returns the cuda layer."""
    memory_format = CHANNELS_LAST[len(shape)] if layout == "channels_last" else torch.contiguous_format
    inputs = [random_input(shape, 50 + k, dtype, mean=mean + k, std=std).double() for k in range(steps + eval_steps)]
    grads = [random_input(shape, 60 + k, dtype).double() for k in range(steps + eval_steps)]
    layer.backend = "cuda"
    model, got, got_state = _steps(layer, inputs, grads, dtype, memory_format, steps)
    reference = copy.deepcopy(layer).double()
    reference.backend = "reference"
    _, expected, expected_state = _steps(reference, inputs, grads, torch.float64, torch.contiguous_format, steps,
                                         torch.device("cpu"))
    for (out, grad_x, grad_w, grad_b), (e_out, e_grad_x, e_grad_w, e_grad_b) in zip(got, expected):
        assert_close(out, e_out, dtype)
        assert_close(grad_x, e_grad_x, dtype, 10)
        sums = torch.float32 if dtype == torch.float32 else dtype  # sums over the batch
        assert_close(grad_w, e_grad_w, sums, 100)
        assert_close(grad_b, e_grad_b, sums, 100)
    assert got_state.keys() == expected_state.keys()
    for name in got_state.keys() & {"running_mean", "running_var"}:
        assert_close(got_state[name], expected_state[name], torch.float32, 10 if dtype == torch.float32 else 1000)
    if "num_batches_tracked" in got_state:
        assert torch.equal(got_state["num_batches_tracked"], expected_state["num_batches_tracked"])
    return model


# Whole 16-byte packs in every dtype: a planar tile that straddles samples
# (S = 64, N = 5), several tiles per channel, one channel per block's warp,
# interleaved channel groups that end part-way through a warp's lanes.
GRID = [
    ((5, 3, 4, 4, 4), "contiguous"),
    ((2, 4, 16, 16, 8), "contiguous"),
    ((2, 40, 2, 2, 2), "contiguous"),
    ((2, 16, 8, 8), "contiguous"),
    ((4, 16, 8, 8, 4), "channels_last"),
    ((2, 40, 3, 2, 2), "channels_last"),
    ((3, 8, 5, 7), "channels_last"),
]
# Not in whole 16-byte packs: one element per pack (odd spatial sizes, odd
# channel counts, one value per channel and sample).
ODD = [
    ((2, 3, 3, 3, 3), "contiguous"),
    ((3, 5, 7, 9, 5), "contiguous"),
    ((2, 5, 3, 3, 3), "channels_last"),
    ((3, 6, 5, 7), "channels_last"),
    ((4, 7, 1, 1), "channels_last"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,layout", GRID + ODD,
                         ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else c)
def test_single_pass_matches_reference(module, shape, layout, dtype):
    layer = make_layer(LAYERS[len(shape)], shape[1], seed=len(shape), activation="leaky_relu",
                       negative_slope=0.2)
    model = _compare(layer, shape, dtype, layout)
    assert _passes(model) != (0, 0), "the single pass ran eval"
    model.train()
    assert all(_passes(model)), "the single pass ran training"
    vector = (shape, layout) in GRID
    assert all(r.vector == vector for r in _plan(model).launches.resident)


@pytest.mark.parametrize("options", [{"activation": "relu"}, {"activation": None},
                                     {"track_running_stats": False}, {"momentum": 0.3, "temperature": 0.5}],
                         ids=["relu", "identity", "no_running_stats", "momentum_temperature"])
def test_single_pass_settings(module, options):
    layer = make_layer(acn.ACNorm3d, 8, seed=3, **options)
    _compare(layer, (2, 8, 4, 4, 8), layout="channels_last")


def test_large_mean_small_spread(module):
    """CT-like intensities: each tile centres its moments on its own first
    value and the merge shifts them to the channel's, so nothing of the
    variance is lost at a mean of 1e3 and a spread of 1e-2."""
    layer = make_layer(acn.ACNorm3d, 4, seed=5)
    model = _compare(layer, (2, 4, 16, 16, 8), mean=1e3, std=1e-2, steps=2, eval_steps=0)
    assert _plan(model).launches.resident[0].tiles > 1


def _capacity(blocks: int):
    return lambda module, dtype, planar, packs, vector, backward, index: blocks


def _threshold(module, packs: int, shape, layout) -> int:
    """The fewest blocks the GPU must hold for the fp32 single pass with
    ``packs`` packs per lane at ``shape``, found through the plan's own choice."""
    x = torch.zeros(shape).contiguous(memory_format=CHANNELS_LAST[len(shape)] if layout == "channels_last"
                                      else torch.contiguous_format)
    geo = launch.geometry(x)
    for blocks in range(1, 1 << 16):
        if launch.resident_geometry(geo, 4, (packs,), module.RESIDENT_WARPS, lambda p, v, held=blocks: held):
            return blocks
    raise AssertionError("no capacity fits")


@pytest.mark.parametrize("shape,layout", [((2, 4, 16, 16, 8), "contiguous"), ((4, 16, 8, 8, 4), "channels_last")],
                         ids=["planar", "interleaved"])
def test_either_side_of_the_capacity(module, shape, layout, monkeypatch):
    """At the fewest blocks each variant needs it runs; one block fewer, the
    next larger variant (or the multi-pass kernels) takes over; every choice
    matches the reference."""
    small, large = module.RESIDENT_PACKS
    at_small, at_large = _threshold(module, small, shape, layout), _threshold(module, large, shape, layout)
    assert at_large < at_small
    layer = make_layer(acn.ACNorm3d, shape[1], seed=7, activation="relu")
    for blocks, packs in [(at_small, small), (at_small - 1, large), (at_large, large), (at_large - 1, 0)]:
        monkeypatch.setattr(cuda_backend, "resident_capacity", _capacity(blocks))
        model = _compare(layer, shape, layout=layout, steps=2, eval_steps=0)
        assert _passes(model) == (packs, packs), blocks
        # What the benchmark table reports of the row, and the bytes its bandwidth counts.
        assert fused_passes(model) == (("single", 5) if packs else ("multi", 8))
        if packs:
            assert _plan(model).launches.resident[0].blocks <= blocks


def test_single_pass_is_reproducible(module):
    layer = make_layer(acn.ACNorm3d, 16, seed=8, backend="cuda").to(DEVICE)
    x = random_input((4, 16, 8, 8, 4), 9).to(DEVICE).contiguous(memory_format=torch.channels_last_3d)
    grad = random_input(x.shape, 10).to(DEVICE).contiguous(memory_format=torch.channels_last_3d)
    layer(x).backward(grad)  # builds the plan
    runs = []
    for _ in range(2):
        model = copy.deepcopy(layer)
        xi = x.clone().requires_grad_()
        out = model(xi)
        out.backward(grad)
        runs.append((out, xi.grad, model.weight_target.grad, model.running_var))
        assert all(_passes(model))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_misaligned_input_takes_the_multi_pass_kernels(module):
    """16-byte packs need 16-byte aligned tensors: an input one element past a
    boundary, of the plan's signature, runs the multi-pass kernels instead."""
    shape = (2, 4, 4, 4, 8)
    layer = make_layer(acn.ACNorm3d, 4, seed=11, backend="cuda").to(DEVICE)
    reference = copy.deepcopy(layer).double()
    reference.backend = "reference"
    x = random_input(shape, 12).to(DEVICE)
    layer(x)
    reference(x.cpu().double())
    base = random_input((x.numel() + 1,), 13).to(DEVICE)
    shifted = base[1:].view(shape)
    assert shifted.data_ptr() % 16 != 0
    if module.emulated:
        start = module.emulated_launches()
    out = layer(shifted)
    if module.emulated:
        assert module.emulated_launches() - start == 3
    assert_close(out.cpu(), reference(shifted.cpu().double()))
    assert_close(layer.running_var.cpu(), reference.running_var, torch.float32, 10)


@pytest.mark.parametrize("name", ["weight", "bias_target"])
def test_non_finite_parameters_leave_the_state_alone(module, name):
    if DEVICE.type == "cuda":
        pytest.skip("on a GPU the kernel's finding is read by the next call (test_gpu.py)")
    layer = make_layer(acn.ACNorm3d, 8, seed=14, backend="cuda")
    x = random_input((2, 8, 4, 4, 4), 15)
    layer(x)
    assert all(_passes(layer))
    with torch.no_grad():
        getattr(layer, name)[5] = float("nan")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=rf"ACNorm3d\(8\): {name} contain\(s\) NaN or infinite"):
        layer(x)
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_a_grid_the_gpu_cannot_hold_takes_the_multi_pass_kernels(module, monkeypatch):
    """A capacity the GPU does not have (as under MPS limits or a partitioned
    GPU, smaller than the occupancy the plan was built with): the cooperative
    launch is refused before anything runs, never waits for blocks that
    cannot start, and the step runs the multi-pass kernels instead."""
    if not module.emulated:
        pytest.skip("needs a capacity beyond the GPU's, which only the emulator can be told")
    monkeypatch.setattr(cuda_backend, "resident_capacity", _capacity(1 << 20))
    layer = make_layer(acn.ACNorm3d, 520, seed=16)  # a warp per channel: 65 blocks, the emulator holds 64
    model = _compare(layer, (2, 520, 2, 2, 2), steps=2, eval_steps=0)
    assert _plan(model).launches.resident[0].blocks > 64
    x = random_input((2, 520, 2, 2, 2), 17)
    start = module.emulated_launches()
    model(x)
    assert module.emulated_launches() - start == 3


def test_capacity_summary_names_every_variant(module):
    """What ``acnorm info`` prints per GPU: each variant's blocks, forward/backward."""
    summary = cuda_backend.capacity_summary(module, DEVICE.index if DEVICE.type == "cuda" else -1)
    parts = summary.split(", ")
    assert [p.rsplit(" ", 3)[0] for p in parts] == [
        "float32 planar", "float32 channels-last", "bfloat16 planar", "bfloat16 channels-last"]
    for part in parts:
        held = part.split(" ", 2)[2].split(" | ")
        assert len(held) == len(module.RESIDENT_PACKS)
        assert all(int(n) > 0 for pair in held for n in pair.split("/"))
