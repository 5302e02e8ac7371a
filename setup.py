"""Build script for acnorm-fused.

The Python package is pure Python. The CUDA extension in ``csrc/`` is optional
and controlled by ``ACNORM_BUILD_CUDA``:

* ``auto`` (default): build it when ``csrc/`` holds CUDA sources and ``nvcc``
  is found, otherwise build nothing, quietly;
* ``0``: never build it;
* ``1``: build it, and fail loudly when that is impossible.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _cuda_sources() -> list[Path]:
    return sorted(CSRC.glob("**/*.cu")) if CSRC.is_dir() else []


def _want_cuda_build() -> bool:
    mode = os.environ.get("ACNORM_BUILD_CUDA", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        raise SystemExit(f"ACNORM_BUILD_CUDA must be auto, 0 or 1 (got {mode!r})")
    if mode == "0":
        return False
    has_sources = bool(_cuda_sources())
    has_nvcc = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
    if mode == "1":
        if not has_sources:
            raise SystemExit("ACNORM_BUILD_CUDA=1 but csrc/ contains no CUDA sources to build")
        if not has_nvcc:
            raise SystemExit("ACNORM_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        return True
    return has_sources and has_nvcc


if _want_cuda_build():
    # The extension build arrives together with the kernels in csrc/.
    raise SystemExit("this source tree does not define a CUDA extension build yet")

setup()
