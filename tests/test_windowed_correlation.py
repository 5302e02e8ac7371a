"""S applied by windows over the sorted source signatures (wide layers) against
the dense S, on random and adversarial signatures: ties, clusters, huge and
tiny temperatures, signatures over many orders of magnitude. Each test runs
on both implementations of the windowed step: the compiled one
(acnorm_fused._cpu) and the PyTorch operations that stand in without it."""

from __future__ import annotations

import importlib

import pytest
import torch

import acnorm_fused as acn

from helpers import EXPECT_CPU_EXTENSION, assert_close, hand_correlation, make_affines, random_input, skip_or_fail

correlation = importlib.import_module("acnorm_fused.correlation")  # the package exports a function of that name


@pytest.fixture(autouse=True, params=["compiled", "pytorch"])
def implementation(request, monkeypatch):
    """The windowed step compiled, or as PyTorch operations (the compiled module hidden)."""
    if request.param == "compiled":
        if correlation._compiled is None:
            skip_or_fail(f"acnorm_fused._cpu: {correlation.compiled_windows_status()}", EXPECT_CPU_EXTENSION)
    else:
        monkeypatch.setattr(correlation, "_compiled", None)
    return request.param


def _affines_with(y_s: torch.Tensor, y_t: torch.Tensor, seed: int) -> torch.Tensor:
    """(4, C) float64 affine rows whose signatures (eps 1e-5) are about ``y_s`` and ``y_t``."""
    g = torch.Generator().manual_seed(seed)
    w_s = 0.2 + torch.rand(y_s.shape, generator=g, dtype=torch.float64)
    w_t = 0.2 + torch.rand(y_t.shape, generator=g, dtype=torch.float64)
    return torch.stack((w_s, y_s * (w_s + 1e-5), w_t, y_t * (w_t + 1e-5)))


def _signatures(kind: str, channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn():
        return torch.randn(channels, generator=g, dtype=torch.float64)

    if kind == "random":
        y_s = randn()
        return y_s, y_s + 0.3 * randn()
    if kind == "ties":  # duplicates on a coarse grid, targets on the same grid
        y_s = torch.round(3 * randn()) / 4
        return y_s, torch.round(3 * randn()) / 4
    if kind == "unchanged":  # target = source: each row keeps its diagonal and its exact ties
        y_s = torch.round(8 * randn()) / 8
        return y_s, y_s.clone()
    if kind == "clusters":  # a few tight clusters
        centres = 5 * randn()[:4]
        y_s = centres[torch.randint(0, 4, (channels,), generator=g)] + 1e-9 * randn()
        return y_s, y_s + 1e-3 * randn()
    if kind == "magnitudes":  # |y| from 1e-6 to 1e4, both signs (near-zero gammas)
        magnitude = 10 ** (10 * torch.rand(channels, generator=g, dtype=torch.float64) - 6)
        y_s = torch.sign(randn()) * magnitude
        return y_s, y_s * (1 + 0.1 * randn())
    raise ValueError(kind)


KINDS = ["random", "ties", "unchanged", "clusters", "magnitudes"]
TEMPERATURES = [1e4, 1.0, 0.1, 0.01]


def _dense_and_windowed(affines: torch.Tensor, temperature: float, dense_dtype=torch.float64):
    """The dense S in ``dense_dtype`` with the entries the windows keep: the
    kernels' rule ``|y_t[i] - y_s[j]| <= |y_t[i] - y_s[i]|``, decided in the
    parameters' dtype (the dense path compares the softmax values instead,
    which can differ where distances differ by a rounding); and the windowed
    state of ``affines``."""
    signatures = correlation.signatures(affines[0::2], affines[1::2], 1e-5)
    y_s, y_t = signatures
    kept = (y_t[:, None] - y_s).abs() <= (y_t - y_s).abs()[:, None]
    y_s, y_t = signatures.to(dense_dtype)  # the same signatures, not recomputed in dense_dtype
    affinity = torch.softmax((y_t[:, None] - y_s).abs().div(-temperature), dim=1)
    return affinity * kept, correlation.windowed_state(signatures)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("channels", [1024, 1537])
def test_windowed_products_equal_the_dense_ones_in_float64(kind, temperature, channels):
    affines = _affines_with(*_signatures(kind, channels, seed=channels), seed=1)
    s, state = _dense_and_windowed(affines, temperature)
    rows = torch.cat((affines[2:], random_input((2, channels), 5, torch.float64)))
    grads = random_input((3, channels), 6, torch.float64)
    forward = correlation.recalibrate(state, rows, temperature)
    torch.testing.assert_close(forward, torch.addmm(rows, rows, s.t()), rtol=1e-9, atol=1e-9)
    backward = correlation.recalibrate_grad(state, grads, temperature)
    torch.testing.assert_close(backward, torch.addmm(grads, grads, s), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("implementation", ["pytorch"], indirect=True)
@pytest.mark.parametrize("kind,temperature,linear", [
    ("random", 1.0, True), ("random", 0.01, False), ("magnitudes", 1e4, True), ("magnitudes", 1.0, False),
])
def test_both_scales_of_the_sums_are_taken(kind, temperature, linear):
    """In the PyTorch version, signatures within 400 T of each other are summed
    in linear scale, wider ranges in the log domain: the float64 test above
    covers both. (The compiled version has one scheme for all ranges.)"""
    affines = _affines_with(*_signatures(kind, 1024, seed=1024), seed=1)
    _, state = _dense_and_windowed(affines, temperature)
    assert correlation._Windows(state, temperature).linear is linear


@pytest.mark.parametrize("implementation", ["compiled"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_window_state_is_the_pytorch_one(kind, dtype, monkeypatch):
    """Sort order and window edges, bit for bit: the compiled search decides
    the rule in the signatures' dtype as the PyTorch comparison does."""
    affines = _affines_with(*_signatures(kind, 1537, seed=5), seed=3).to(dtype)
    signatures = correlation.signatures(affines[0::2], affines[1::2], 1e-5)
    compiled = correlation.windowed_state(signatures)
    monkeypatch.setattr(correlation, "_compiled", None)
    assert torch.equal(compiled, correlation.windowed_state(signatures))


@pytest.mark.parametrize("implementation", ["compiled"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_forward_step_is_the_pytorch_one(kind, dtype, monkeypatch):
    """The torch backend's forward C x C step in one compiled call: signatures
    and window state bit for bit, the effective affine to rounding."""
    affines = _affines_with(*_signatures(kind, 1537, seed=6), seed=4).to(dtype)
    affines[0, :3] = torch.tensor([0.0, -1e-7, -2.0], dtype=dtype)  # gammas at and around zero, negative
    compiled = correlation.recalibrated_state(affines, 1e-5, 0.5)
    assert compiled.shape == (correlation.state_rows(1537, affines.device, dtype) + 2, 1537)
    monkeypatch.setattr(correlation, "_compiled", None)
    expected = correlation.recalibrated_state(affines, 1e-5, 0.5)
    assert expected.shape == (correlation.WINDOW_ROWS + 2, 1537)
    rows = correlation.WINDOW_ROWS
    assert torch.equal(compiled[:rows], expected[:rows])
    assert_close(compiled[-2:], expected[-2:], scale=0.1)


@pytest.mark.parametrize("implementation", ["compiled"], indirect=True)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_products_from_the_compiled_forward_cache(kind, temperature, dtype):
    """The compiled forward leaves in the state what the products would build
    again (weights at the window edges, neighbour steps, float64 bit for bit):
    the products from it equal the dense ones as those from a plain state do."""
    affines = _affines_with(*_signatures(kind, 1537, seed=7), seed=5).to(dtype)
    s64, _ = _dense_and_windowed(affines, temperature)
    cached = correlation.recalibrated_state(affines, 1e-5, temperature)[:-2]
    assert cached.shape[0] > correlation.WINDOW_ROWS, "the state carries the cache"
    rows = torch.cat((affines[2:], random_input((1, 1537), 8, dtype)))
    grads = random_input((3, 1537), 9, dtype)
    tolerance = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for got, expected in [
        (correlation.recalibrate(cached, rows, temperature), torch.addmm(rows.double(), rows.double(), s64.t())),
        (correlation.recalibrate_grad(cached, grads, temperature), torch.addmm(grads.double(), grads.double(), s64)),
    ]:
        assert got.dtype == dtype
        scale = float(expected.abs().max())
        torch.testing.assert_close(got.double(), expected, rtol=tolerance["rtol"], atol=tolerance["atol"] * scale)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_windowed_products_in_float32_within_batchnorm_tolerance(kind, temperature):
    """float32 parameters: the windowed products (float64 inside) against the
    float64 dense ones, as close as BatchNorm's own float32 tolerance."""
    affines = _affines_with(*_signatures(kind, 4096, seed=3), seed=2).float()
    s64, state = _dense_and_windowed(affines, temperature)
    rows, grads = affines[2:], random_input((2, 4096), 7)
    scale = rows.double().abs().max()
    forward = correlation.recalibrate(state, rows, temperature)
    assert forward.dtype == torch.float32
    expected = torch.addmm(rows.double(), rows.double(), s64.t())
    torch.testing.assert_close(forward.double(), expected, rtol=1e-5, atol=1e-5 * float(scale))
    backward = correlation.recalibrate_grad(state, grads, temperature)
    torch.testing.assert_close(backward.double(), torch.addmm(grads.double(), grads.double(), s64),
                               rtol=1e-5, atol=1e-5 * float(grads.abs().max()))


def test_ties_with_the_diagonal_are_kept():
    """Target = source on a coarse grid: row i keeps exactly the channels whose
    signature equals y_s[i]; the windowed product sees the same entries."""
    y = torch.round(8 * random_input((1024,), 4, torch.float64)) / 8  # exact ties
    state = correlation.windowed_state(torch.stack((y, y)))
    affinity = torch.softmax((y[:, None] - y).abs().div(-1.0), dim=1)
    s = affinity * (y[:, None] == y[None, :])
    assert torch.equal(s > 0, affinity >= affinity.diagonal()[:, None]), "the dense rule agrees on exact ties"
    indicator = torch.eye(1024, dtype=torch.float64)[:8]  # S^T of unit rows: the first rows of S
    torch.testing.assert_close(correlation.recalibrate_grad(state, indicator, 1.0) - indicator, s[:8],
                               rtol=1e-12, atol=1e-15)


def test_windowed_path_by_hand_on_a_small_layer(monkeypatch):
    """With the thresholds lowered, a 7-channel layer takes the windowed path:
    against the hand computation of S, and gradcheck of the effective affine."""
    monkeypatch.setattr(correlation, "WINDOWED_MIN_CHANNELS", 3)
    monkeypatch.setattr(correlation, "COMPILED_WINDOWED_MIN_CHANNELS", 3)
    params = make_affines(7, 8, torch.float64)
    for temperature in (0.3, 1.0, 5.0):
        s = hand_correlation(*params, temperature=temperature)
        state = correlation.recalibration_state(correlation.stack_affines(*params), 1e-5, temperature)
        assert state.shape == (correlation.WINDOW_ROWS, 7), "the windowed state"
        w, b = acn.effective_affine(*params, temperature=temperature)
        torch.testing.assert_close(w, params[2] + s @ params[2], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b, params[3] + s @ params[3], rtol=1e-12, atol=1e-14)
        rows = random_input((2, 7), 9, torch.float64).requires_grad_()  # S is a constant, as in the dense path
        assert torch.autograd.gradcheck(correlation.recalibrate, (state, rows, temperature))
    assert correlation.correlation_sum(*params) == pytest.approx(float(hand_correlation(*params).sum()), rel=1e-12)


def test_a_wide_layer_trains_as_the_authors_formulation():
    """ACNorm3d with 1024 channels, backend torch (windowed) against the
    reference backend (the dense S), float64: output, gradients, statistics."""
    channels = 1024
    layers = {}
    for backend in ("torch", "reference"):
        layer = acn.ACNorm3d(channels, backend=backend).double()
        with torch.no_grad():
            for name, value in zip(("weight", "bias", "weight_target", "bias_target"),
                                   make_affines(channels, 9, torch.float64)):
                getattr(layer, name).copy_(value)
        layers[backend] = layer
    x = random_input((2, channels, 2, 2, 3), 10, torch.float64)
    grad = random_input(x.shape, 11, torch.float64)
    results = {}
    for backend, layer in layers.items():
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.backward(grad)
        results[backend] = (out, xi.grad, layer.weight_target.grad, layer.bias_target.grad, layer.running_mean)
    for got, expected in zip(results["torch"], results["reference"]):
        assert_close(got, expected)


def test_ac_corr_of_a_wide_layer_is_the_sum_of_s():
    params = make_affines(2048, 12, torch.float32)
    dense = float(acn.correlation(*params).double().sum())
    assert correlation.correlation_sum(*params) == pytest.approx(dense, rel=1e-5)
