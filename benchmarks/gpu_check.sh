#!/usr/bin/env bash
# One run on a GPU machine (no network): environment, build, GPU tests and the
# benchmark table, with a report written to $OUT (default: a local folder).
# Meant to finish within about 9 minutes (the benchmark table takes about 6 of
# them: every case compiles the reference for its own shape, ~13 s on an H200
# machine, as a user's fixed-shape network would); each step has a time limit
# against hangs, a failing step does not stop the later ones, and every step
# leaves what it has finished in the report, so a run cut short still says
# something. GPU_CHECK_STEPS picks the steps after the build (default: "tests
# bench profile network kernels"), for a rerun that must fit the rest of a
# short lease. The network step (whole networks' training steps, `acnorm bench
# network`) is sized to about 3 minutes more, not yet measured on a GPU; its
# networks come from MONAI, pure Python (16 MB, needs only torch and numpy):
# where the GPU machine lacks it, bring a copy and name its folder in
# PYTHONPATH.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
REPORT="$OUT/report.md"
PY="${PYTHON:-python3}"
STEPS=" ${GPU_CHECK_STEPS:-tests bench profile network kernels} "
export PYTHONUNBUFFERED=1

section() { printf '\n## %s\n\n```\n' "$1" >> "$REPORT"; }
endsection() { printf '```\n' >> "$REPORT"; }
run() {  # run LIMIT_SECONDS TITLE COMMAND...: time-limited, output into the report and the console
  local limit=$1 title=$2; shift 2
  section "$title"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$REPORT"
  local rc=${PIPESTATUS[0]}
  printf '[exit %s after %ss]\n' "$rc" "$((SECONDS - start))" | tee -a "$REPORT"
  endsection
  return 0
}

printf '# GPU check %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$REPORT"
# "-dirty": the tree differs from that commit (a copied tree may carry an older .git).
printf '\ncommit: %s\n' "$(git describe --always --dirty 2>/dev/null || echo unknown)" >> "$REPORT"

run 30 "GPU and driver" nvidia-smi
run 30 "Python, torch, triton" "$PY" -c '
import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
'
run 30 "nvcc" nvcc --version

# No network here: install without build isolation or dependencies, the CUDA
# module compiled for this GPU only (seconds, not minutes); fall back to the
# source tree on the path if even that is impossible.
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
ARCH="${ACNORM_CUDA_ARCHS:-${ARCH:-9.0}}"
run 150 "install, CUDA module built for $ARCH" \
  env ACNORM_BUILD_CUDA=1 ACNORM_CUDA_ARCHS="$ARCH" "$PY" -m pip install --no-build-isolation --no-deps -e .
if ! "$PY" -c 'import acnorm_fused._cuda' 2>/dev/null; then
  run 150 "in-place build of the CUDA module (the install did not give one)" \
    env ACNORM_BUILD_CUDA=1 ACNORM_CUDA_ARCHS="$ARCH" "$PY" setup.py build_ext --inplace
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

run 30 "acnorm info" "$PY" -m acnorm_fused.cli info
# The tests spend most of their time compiling Triton kernels, a CPU job:
# spread them over processes when pytest-xdist is there.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --durations=8)
if "$PY" -c 'import xdist' 2>/dev/null; then PYTEST+=(-n 6 --dist loadgroup); fi
# Most important first: correctness on the benchmark shapes (both kernel
# backends), then the table (the CUDA kernels as auto's pick, Triton beside
# them), then where the eager step's host time goes, then whole networks, then the kernel test grid
# (compiled for the GPU this time).
case $STEPS in *" tests "*) run 150 "GPU tests" "${PYTEST[@]}" -m gpu tests ;; esac
case $STEPS in *" bench "*) run 400 "benchmark table" "$PY" -m acnorm_fused.cli bench --repeats 10 --out "$OUT" ;; esac
case $STEPS in *" profile "*) run 90 "host profile" "$PY" -m acnorm_fused.cli bench host --out "$OUT" ;; esac
case $STEPS in *" network "*) run 240 "network table" "$PY" -m acnorm_fused.cli bench network --out "$OUT" ;; esac
case $STEPS in *" kernels "*) run 90 "kernel tests on the GPU" "${PYTEST[@]}" -m interpret tests ;; esac

echo "report: $REPORT"
