"""The compiled windowed C x C step, acnorm_fused._cpu: how it is built and
how it refuses bad calls. Its results are checked against the dense S in
test_windowed_correlation.py (both implementations). CI builds it and sets
ACNORM_EXPECT_CPU_EXTENSION=1, so that its absence fails there."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

from helpers import EXPECT_CPU_EXTENSION, ROOT, import_csrc_toolkit, skip_or_fail

correlation = importlib.import_module("acnorm_fused.correlation")


@pytest.fixture(scope="module")
def compiled():
    try:
        return importlib.import_module("acnorm_fused._cpu")
    except ImportError as error:
        skip_or_fail(f"acnorm_fused._cpu is not built: {error}", EXPECT_CPU_EXTENSION)


def test_is_the_one_the_package_uses(compiled):
    assert correlation._compiled is compiled
    assert compiled.WINDOW_ROWS == correlation.WINDOW_ROWS
    assert compiled.CACHE_DOUBLES == correlation.CACHE_DOUBLES
    assert correlation.compiled_windows_status().startswith("built (")


def test_needs_only_glibc_2_28_at_most(compiled):
    """No C++ runtime, no torch, no libpython: libc, libm and the dynamic loader
    (thread-local storage), so it loads wherever torch's own wheels
    (manylinux_2_28) do, whatever glibc the build machine had."""
    toolkit = import_csrc_toolkit()
    assert set(toolkit.needed_libraries(compiled.__file__)) <= {"libc.so.6", "libm.so.6", "ld-linux-x86-64.so.2"}
    needed = toolkit.glibc_needed(compiled.__file__)
    assert needed, "no GLIBC symbol versions read"
    assert needed <= toolkit.GLIBC_TARGET, (
        f"{compiled.__file__} needs glibc {'.'.join(map(str, needed))}: built without ziglang?")


def test_the_package_runs_without_it(monkeypatch):
    """The PyTorch version stands in; the status line says why."""
    monkeypatch.setattr(correlation, "_compiled", None)
    monkeypatch.setattr(correlation, "_COMPILED_ERROR", "No module named 'acnorm_fused._cpu'")
    assert correlation.compiled_windows_status().startswith("not built (No module named")
    assert not correlation.uses_windows(correlation.WINDOWED_MIN_CHANNELS - 1, torch.device("cpu"))
    assert correlation.uses_windows(correlation.WINDOWED_MIN_CHANNELS, torch.device("cpu"))


@pytest.mark.parametrize("arguments,error,message", [
    ((8, False, 1), TypeError, r"window_state takes 4 arguments \(3 given\)"),
    ((0, False, 1, 1), ValueError, "need at least one channel, got 0"),
    ((8, False, 0, 1), ValueError, "null address"),
])
def test_window_state_refuses_bad_calls(compiled, arguments, error, message):
    with pytest.raises(error, match=message):
        compiled.window_state(*arguments)


def test_window_product_refuses_bad_calls(compiled):
    state = torch.zeros(correlation.WINDOW_ROWS, 8)
    rows = torch.zeros(2, 8)
    good = [8, False, state.data_ptr(), correlation.WINDOW_ROWS, 1.0, 2, rows.data_ptr(), rows.data_ptr(), False]
    for index, value, error, message in [
        (4, 0.0, ValueError, "temperature must be positive"),
        (4, float("nan"), ValueError, "temperature must be positive"),
        (5, -1, ValueError, "rows must be >= 0"),
        (0, -3, ValueError, "need at least one channel, got -3"),
        (0, (1 << 24) + 1, ValueError, "at most 2\\^24 channels, got 16777217"),
        (7, 0, ValueError, "null address"),
        (3, 8, ValueError, "a window state has 6 rows, or 16 with its cache; got 8"),
    ]:
        arguments = list(good)
        arguments[index] = value
        with pytest.raises(error, match=message):
            compiled.window_product(*arguments)
    with pytest.raises(TypeError, match=r"window_product takes 9 arguments \(8 given\)"):
        compiled.window_product(*good[:-1])


@pytest.mark.parametrize("row,value", [(2, 8.0), (2, -1.0), (3, float("nan")), (4, 9.0), (5, 8.5)])
def test_a_state_with_positions_out_of_range_is_refused(compiled, row, value):
    """Sort order and window edges are checked before they index anything."""
    state = correlation.windowed_state(torch.randn(2, 8))
    state[row, 3] = value
    rows = torch.randn(2, 8)
    for transposed in (False, True):
        with pytest.raises(ValueError, match=r"not a window state \(its sort order or window edges are out of range\)"):
            compiled.window_product(8, False, state.data_ptr(), correlation.WINDOW_ROWS, 1.0, 2, rows.data_ptr(),
                                    rows.data_ptr(), transposed)


def test_the_windowed_functions_refuse_wrong_shapes():
    """Before any compiled code reads them, on either implementation."""
    with pytest.raises(ValueError, match=r"recalibrated_state: affines must be a floating-point \(4, C\) tensor, "
                                         r"got \(3, 64\) torch.float32"):
        correlation.recalibrated_state(torch.ones(3, 64))
    with pytest.raises(ValueError, match=r"windowed_state: signature_rows must be a floating-point \(2, C\) tensor"):
        correlation.windowed_state(torch.ones(64))
    with pytest.raises(ValueError, match=r"windowed_state: signature_rows .* got \(2, 64\) torch.int64"):
        correlation.windowed_state(torch.ones(2, 64, dtype=torch.long))
    state = correlation.windowed_state(torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"recalibrate/recalibrate_grad: rows must be \(k, 64\) on cpu"):
        correlation.recalibrate(state, torch.ones(2, 63))
    with pytest.raises(ValueError, match=r"rows must be \(k, 64\)"):
        correlation.recalibrate_grad(state, torch.ones(64))


def test_window_recalibration_refuses_bad_calls(compiled):
    affines, out = torch.ones(4, 8), torch.empty(correlation._cached_state_rows(torch.float32) + 2, 8)
    good = [8, False, affines.data_ptr(), 1e-5, 1.0, out.data_ptr()]
    for index, value in [(3, -1.0), (3, float("nan")), (4, 0.0)]:
        arguments = list(good)
        arguments[index] = value
        with pytest.raises(ValueError, match="eps must be >= 0 and temperature positive"):
            compiled.window_recalibration(*arguments)
    with pytest.raises(ValueError, match="null address"):
        compiled.window_recalibration(*good[:5], 0)
    with pytest.raises(TypeError, match=r"window_recalibration takes 6 arguments \(5 given\)"):
        compiled.window_recalibration(*good[:5])


def test_row_addresses_are_refused_in_the_wrong_number(compiled):
    affines, out = torch.ones(4, 8), torch.empty(correlation._cached_state_rows(torch.float32) + 2, 8)
    rows = tuple(row.data_ptr() for row in affines)
    with pytest.raises(ValueError, match="3 row addresses for 4 rows"):
        compiled.window_recalibration(8, False, rows[:3], 1e-5, 1.0, out.data_ptr())
    with pytest.raises(ValueError, match="null address"):
        compiled.window_recalibration(8, False, (*rows[:3], 0), 1e-5, 1.0, out.data_ptr())
    with pytest.raises(TypeError):
        compiled.window_recalibration(8, False, (*rows[:3], "row"), 1e-5, 1.0, out.data_ptr())
    state = correlation.recalibrated_state(torch.rand(4, 8) + 0.5)
    grads = torch.randn(2, 8)
    pair = (grads[0].data_ptr(), grads[1].data_ptr())
    with pytest.raises(ValueError, match="1 row addresses for 2 rows"):
        compiled.window_product(8, False, state.data_ptr(), 16, 1.0, 2, pair[:1], pair, True)
    with pytest.raises(ValueError, match="rows must be < 2"):
        compiled.window_product(8, False, state.data_ptr(), 16, 1.0, 1 << 40, pair, pair, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_affine_rows_are_reported_and_nothing_is_written(compiled, dtype, value):
    """Bit 1 << row for each row holding NaN or an infinity; out is left as it was."""
    channels = 40
    for bad_rows in [(0,), (1,), (2,), (3,), (0, 3), (1, 2)]:
        affines = torch.rand(4, channels, dtype=dtype) + 0.5
        for row in bad_rows:
            affines[row, (7 * row) % channels] = value
        out = torch.full((correlation._cached_state_rows(dtype) + 2, channels), 3.0, dtype=dtype)
        bits = compiled.window_recalibration(channels, dtype == torch.float64, affines.data_ptr(), 1e-5, 1.0,
                                             out.data_ptr())
        assert bits == sum(1 << row for row in bad_rows)
        assert torch.equal(out, torch.full_like(out, 3.0))
    affines[:] = 1.0
    affines[2:, 5] = value
    with pytest.raises(ValueError,
                       match=r"recalibrated_state: weight_target, bias_target contain\(s\) NaN or infinite values"):
        correlation.recalibrated_state(affines)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_apart_and_in_place_give_the_same_bits(compiled, dtype):
    """A tuple of row addresses reads and writes the rows as contiguous rows do,
    and a product written over its own input equals one written elsewhere."""
    channels, double = 96, dtype == torch.float64
    generator = torch.Generator().manual_seed(3)
    affines = torch.rand(4, channels, generator=generator, dtype=dtype) + 0.5
    affines[1::2] = 0.2 * torch.randn(2, channels, generator=generator, dtype=dtype)
    rows = correlation._cached_state_rows(dtype)
    stacked = torch.empty(rows + 2, channels, dtype=dtype)
    apart = torch.empty_like(stacked)
    parameters = [affines[k].clone() for k in range(4)]  # four separate storages
    assert compiled.window_recalibration(channels, double, affines.data_ptr(), 1e-5, 0.5, stacked.data_ptr()) == 0
    assert compiled.window_recalibration(channels, double, tuple(p.data_ptr() for p in parameters), 1e-5, 0.5,
                                         apart.data_ptr()) == 0
    bits = torch.int64 if double else torch.int32  # the cache rows hold float64 bits: compared as bits
    assert torch.equal(stacked.view(bits), apart.view(bits))
    for transposed in (False, True):
        for state, state_rows in ((stacked, rows), (stacked[:correlation.WINDOW_ROWS].contiguous(),
                                                    correlation.WINDOW_ROWS)):
            values = torch.randn(3, channels, generator=generator, dtype=dtype)
            expected = torch.empty_like(values)
            compiled.window_product(channels, double, state.data_ptr(), state_rows, 0.5, 3, values.data_ptr(),
                                    expected.data_ptr(), transposed)
            separate = [values[k].clone() for k in range(3)]
            addresses = tuple(v.data_ptr() for v in separate)
            compiled.window_product(channels, double, state.data_ptr(), state_rows, 0.5, 3, addresses, addresses,
                                    transposed)
            assert torch.equal(torch.stack(separate), expected)
            compiled.window_product(channels, double, state.data_ptr(), state_rows, 0.5, 3, values.data_ptr(),
                                    values.data_ptr(), transposed)
            assert torch.equal(values, expected)


def test_unknown_cpu_build_mode_is_refused():
    """setup.py reads ACNORM_BUILD_CPU like ACNORM_BUILD_CUDA."""
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                            env={"ACNORM_BUILD_CPU": "yes", "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "ACNORM_BUILD_CPU must be auto, 0 or 1 (got 'yes')" in result.stderr
