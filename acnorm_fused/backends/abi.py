"""The numbering the kernel backends share: dtype codes, activation codes, the
rows of ``aux`` and the bits of the finalise step's status word.

Defined here once. The Triton kernels read these constants; the compiled
module carries its own copy (``csrc/acnorm/kernels.h``), which
:func:`check_module_abi` compares with these when the ``cuda`` backend loads
it, so that a module built from other sources is refused, not misread.
"""

from __future__ import annotations

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACTIVATION_CODES = {"": 0, "relu": 1, "leaky_relu": 2}
# Rows of aux, (AUX_ROWS, C) fp32, written by the forward finalise: the scale
# W * invstd, B, the mean as centre_hi + centre_lo, y_s, y_t, and the row
# maximum and exponential sum of the softmax behind S.
AUX_ROW = {"scale": 0, "shift_b": 1, "centre_hi": 2, "centre_lo": 3, "source_sig": 4, "target_sig": 5,
           "row_max": 6, "row_sum": 7}
AUX_ROWS = len(AUX_ROW)
# Status bits of the forward finalise: the affine (in the order of
# ``acnorm_fused._checks.AFFINE_NAMES``) that holds a NaN or an infinity.
NON_FINITE_BITS = (1, 2, 4, 8)


def check_module_abi(module) -> None:
    """Raise when the compiled module numbers anything differently from this file."""
    expected = {
        "DTYPE_CODES": {str(dtype).removeprefix("torch."): code for dtype, code in DTYPE_CODES.items()},
        "ACTIVATION_CODES": ACTIVATION_CODES,
        "AUX_ROWS": AUX_ROWS,
        "AUX_ROW": AUX_ROW,
        "NON_FINITE_BITS": NON_FINITE_BITS,
    }
    for name, value in expected.items():
        found = getattr(module, name, None)
        if found is not None and not isinstance(found, int):
            found = tuple(found) if isinstance(value, tuple) else dict(found)
        if found != value:
            raise RuntimeError(
                f"acnorm_fused._cuda was built from other sources than this package: its {name} is "
                f"{found!r}, this package's {value!r}; rebuild it (pip install . with ACNORM_BUILD_CUDA=1)")
