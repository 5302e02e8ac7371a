"""Side-by-side benchmark of AC-Norm against the authors' formulation and BatchNorm.

One training step (forward and backward) of three layers on the same input:
the reference backend (the authors' two-BatchNorm formulation), the fused
path that ``backend="auto"`` picks for the device, and ``nn.BatchNorm3d``.
They are timed interleaved, so that drift of the machine hits all three
alike, and the table reports the ratios that the project's speed bars use.
This module backs ``acnorm bench`` and the pytest-benchmark suite.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .backends import resolve_backend
from .modules import ACNorm3d

Shape = tuple[int, int, int, int, int]

# 3D shapes of real medical networks (nnU-Net stages, Models Genesis, a large
# volume with few channels, launch-bound deep layers), for GPUs.
GPU_SHAPES: tuple[Shape, ...] = (
    (2, 32, 128, 128, 128),
    (2, 32, 112, 112, 112),
    (2, 64, 64, 64, 64),
    (2, 128, 32, 32, 32),
    (2, 256, 16, 16, 16),
    (2, 320, 8, 8, 8),
    (6, 64, 64, 64, 32),
    (1, 16, 224, 224, 144),
)
GPU_CHANNELS_LAST_SHAPES: tuple[Shape, ...] = ((2, 32, 128, 128, 128), (2, 64, 64, 64, 64))
# Smaller 3D shapes that a CPU runs in seconds; the first is the CPU bar's shape.
CPU_SHAPES: tuple[Shape, ...] = ((2, 32, 32, 32, 32), (2, 64, 16, 16, 16), (2, 16, 48, 48, 48))
CPU_CHANNELS_LAST_SHAPES: tuple[Shape, ...] = ((2, 32, 32, 32, 32),)

IMPLEMENTATIONS = ("reference", "acnorm", "batchnorm")


@dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    shape: Shape
    dtype: str = "float32"
    layout: str = "contiguous"  # or "channels_last"

    def label(self) -> str:
        return f"{'x'.join(map(str, self.shape))} {self.dtype} {self.layout}"


@dataclass
class Result:
    """Step times (ms, one sample per round) and peak step memory (bytes) of the layers."""

    case: Case
    backend: str
    samples_ms: dict[str, list[float]] = field(default_factory=dict)
    peak_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def times_ms(self) -> dict[str, float]:
        """Median step time of each layer."""
        return {name: statistics.median(values) for name, values in self.samples_ms.items()}

    def ratio(self, numerator: str, denominator: str) -> float:
        """Median over rounds of the time ratio of two layers timed in the same round,
        which cancels the drift of a shared machine better than a ratio of medians."""
        pairs = zip(self.samples_ms[numerator], self.samples_ms[denominator])
        return statistics.median(a / b for a, b in pairs)

    @property
    def reference_over_acnorm(self) -> float:
        return self.ratio("reference", "acnorm")

    @property
    def acnorm_over_batchnorm(self) -> float:
        return self.ratio("acnorm", "batchnorm")

    @property
    def memory_acnorm_over_batchnorm(self) -> float:
        return self.peak_bytes["acnorm"] / max(self.peak_bytes["batchnorm"], 1)


def default_cases(device: torch.device) -> list[Case]:
    """The medical 3D shapes on a GPU, smaller 3D shapes on a CPU; fp32 and bf16 each."""
    if device.type == "cuda":
        shapes, cl_shapes = GPU_SHAPES, GPU_CHANNELS_LAST_SHAPES
    else:
        shapes, cl_shapes = CPU_SHAPES, CPU_CHANNELS_LAST_SHAPES
    cases = []
    for dtype in ("float32", "bfloat16"):
        cases += [Case(shape, dtype) for shape in shapes]
        cases += [Case(shape, dtype, "channels_last") for shape in cl_shapes]
    return cases


def reuse_freed_memory() -> bool:
    """Make glibc keep freed blocks up to 32 MiB for reuse instead of unmapping them.

    With the default settings every step of a CPU benchmark maps its large
    tensors afresh and pays a page fault per 4 KiB page, which on a virtual
    machine costs about as much as the BatchNorm itself and varies run to
    run. A caching allocator (PyTorch's on GPUs, jemalloc or tcmalloc on CPUs)
    avoids that; this does the same for all three layers alike. Returns
    whether the setting took effect (glibc only).
    """
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    largest_cached = 32 * 1024 * 1024  # glibc's upper bound for the mmap threshold
    ok = libc.mallopt(m_mmap_threshold, largest_cached) == 1
    return ok and libc.mallopt(m_trim_threshold, 4 * largest_cached) == 1


def make_layers(channels: int, device: torch.device, seed: int = 0) -> dict[str, nn.Module]:
    """The three layers, with a realistic finetuning state (source != target)."""
    generator = torch.Generator().manual_seed(seed)
    source_w = 0.5 + torch.rand(channels, generator=generator)
    source_b = 0.2 * torch.randn(channels, generator=generator)
    layers: dict[str, nn.Module] = {
        "reference": ACNorm3d(channels, backend="reference"),
        "acnorm": ACNorm3d(channels, backend="auto"),
        "batchnorm": nn.BatchNorm3d(channels),
    }
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.copy_(source_w)
            layer.bias.copy_(source_b)
            if isinstance(layer, ACNorm3d):
                layer.weight_target.copy_(source_w * 1.05)
                layer.bias_target.copy_(source_b + 0.02)
    return {name: layer.to(device).train() for name, layer in layers.items()}


def make_input(case: Case, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Input (requiring grad, as inside a network) and output gradient for ``case``."""
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    x = (3.0 + 2.0 * torch.randn(case.shape, generator=generator)).to(device, dtype)
    grad = torch.randn(case.shape, generator=generator).to(device, dtype)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
        grad = grad.contiguous(memory_format=torch.channels_last_3d)
    return x.requires_grad_(), grad


def training_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """Forward and backward of ``layer`` on ``x``; gradients are dropped."""
    layer(x).backward(grad)
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    steps: dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Wall times in ms of each step, the steps run in turn ``repeats`` times."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    _synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def peak_step_memory(step: Callable[[], None], device: torch.device) -> int:
    """Bytes allocated at the peak of ``step`` beyond what was live before it."""
    if device.type == "cuda":
        _synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def run_case(case: Case, device: torch.device, repeats: int, warmup: int) -> Result:
    """Benchmark the three layers on one case."""
    x, grad = make_input(case, device)
    layers = make_layers(case.shape[1], device)
    steps = {name: (lambda layer=layer: training_step(layer, x, grad)) for name, layer in layers.items()}
    result = Result(case, backend=resolve_backend("auto", x, "acnorm bench"))
    result.samples_ms = time_interleaved(steps, device, repeats, warmup)
    result.peak_bytes = {name: peak_step_memory(step, device) for name, step in steps.items()}
    return result


def run(
    cases: Sequence[Case],
    device: torch.device,
    repeats: int = 20,
    warmup: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    """Benchmark every case, reporting each finished row through ``progress``."""
    results = []
    for index, case in enumerate(cases, 1):
        result = run_case(case, device, repeats, warmup)
        results.append(result)
        if progress is not None:
            progress(
                f"[{index}/{len(cases)}] {case.label()}: ref/acnorm "
                f"{result.reference_over_acnorm:.2f}, acnorm/bn {result.acnorm_over_batchnorm:.2f}"
            )
    return results


def machine_description(device: torch.device) -> str:
    """One line naming the machine the numbers come from."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def to_markdown(results: Sequence[Result], machine: str) -> str:
    """The results as a Markdown table with the machine named."""
    lines = [
        f"Machine: {machine}",
        "",
        "One training step (forward + backward). `reference`: the authors' two-BatchNorm "
        "formulation; `acnorm`: acnorm_fused with backend=auto; `bn`: nn.BatchNorm3d. "
        "Times are medians in ms; memory is the peak allocated during the step.",
        "",
        "| shape | dtype | layout | backend | reference ms | acnorm ms | bn ms "
        "| reference / acnorm | acnorm / bn | peak mem acnorm / bn |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        t = r.times_ms
        lines.append(
            f"| {'x'.join(map(str, r.case.shape))} | {r.case.dtype} | {r.case.layout} "
            f"| {r.backend} | {t['reference']:.3f} | {t['acnorm']:.3f} | {t['batchnorm']:.3f} "
            f"| {r.reference_over_acnorm:.2f} | {r.acnorm_over_batchnorm:.2f} "
            f"| {r.memory_acnorm_over_batchnorm:.3f} |"
        )
    return "\n".join(lines) + "\n"


def to_json(results: Sequence[Result], machine: str) -> str:
    """The results as JSON, ratios included."""
    rows = []
    for r in results:
        row = asdict(r)
        row["median_ms"] = r.times_ms
        row["ratios"] = {
            "reference_over_acnorm": r.reference_over_acnorm,
            "acnorm_over_batchnorm": r.acnorm_over_batchnorm,
            "peak_memory_acnorm_over_batchnorm": r.memory_acnorm_over_batchnorm,
        }
        rows.append(row)
    return json.dumps({"machine": machine, "python": sys.version.split()[0], "results": rows}, indent=2)
