"""The per-layer table (``acnorm bench``): AC-Norm against the authors'
formulation and BatchNorm.

One training step (forward and backward) of three layers on the same input:
the reference backend (the authors' two-BatchNorm formulation), the fused
path that ``backend="auto"`` picks for the device, and ``nn.BatchNorm3d``.
They are timed interleaved, so that drift of the machine hits all three
alike, and the table reports the ratios that the project's speed bars use.

On a CUDA device the table adds ``torch.compile`` of the reference, times the
forward alone as well, uses ``triton.testing.do_bench`` (L2 flushed before
every run; CUDA graphs for launch-bound shapes) and reports the bandwidth the
fused step reaches against a device-to-device copy measured in the same run;
the fused and BatchNorm steps are also replayed from a CUDA graph, which
takes the host's share (Python, launches) out of their times.
This module backs ``acnorm bench`` and the pytest-benchmark suite
(``benchmarks/``).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch import nn

from ..backends import available_backends, resolve_backend
from ..modules import ACNorm3d
from .cases import Case, make_input
from .output import write_bar_chart
from .timing import captures, graph_replay_ms, peak_step_memory, time_interleaved, training_step

IMPLEMENTATIONS = ("reference", "acnorm", "batchnorm")
# Fused GPU backends; on a GPU the one ``auto`` does not pick is timed too.
KERNEL_BACKENDS = ("cuda", "triton")
# Inputs up to this many elements make a launch-bound step on a GPU: they are
# timed as CUDA graphs, so that Python and launch overheads do not hide the kernels.
GRAPH_MAX_NUMEL = 1 << 22
# Layers whose step is also timed from a CUDA graph on every row: the pair of
# the BatchNorm bar, with the host's share taken out.
GRAPH_LAYERS = ("acnorm", "batchnorm")
# Fewest bytes a multi-pass fused training step moves per element of x, in
# units of the element size: the forward reads x twice and writes y (3); the
# backward reads x and dy for the sums, again for dx, and writes dx (5).
MIN_STEP_TRAFFIC = 3 + 5
# The same of the CUDA backend's single pass, per pass: the forward reads x
# once and writes y (2); the backward reads x and dy once, writes dx (3).
SINGLE_PASS_TRAFFIC = {"forward": 2, "backward": 3}


@dataclass
class Result:
    """Step times (ms, one sample per round) and peak step memory (bytes) of the layers."""

    case: Case
    backend: str
    samples_ms: dict[str, list[float]] = field(default_factory=dict)
    peak_bytes: dict[str, int] = field(default_factory=dict)
    # GPU only: forward-only samples, the copy time of x, and the timer used.
    forward_samples_ms: dict[str, list[float]] = field(default_factory=dict)
    copy_ms: float | None = None
    timer: str = "wall clock"
    # GPU only: the step of ``GRAPH_LAYERS`` replayed from a CUDA graph, the GPU's
    # own time without the host's (the same as the samples on graph-timed rows).
    graph_step_ms: dict[str, float] = field(default_factory=dict)
    # The fused layer's passes (see fused_passes) and the fewest bytes per
    # element and byte of element size its step moves.
    passes: str = "multi"
    min_traffic: int = MIN_STEP_TRAFFIC

    @property
    def times_ms(self) -> dict[str, float]:
        """Median step time of each layer."""
        return {name: statistics.median(values) for name, values in self.samples_ms.items()}

    def ratio(self, numerator: str, denominator: str, forward: bool = False) -> float:
        """Median over rounds of the time ratio of two layers timed in the same round,
        which cancels the drift of a shared machine better than a ratio of medians.
        NaN when either layer was not timed."""
        samples = self.forward_samples_ms if forward else self.samples_ms
        if numerator not in samples or denominator not in samples:
            return float("nan")
        pairs = zip(samples[numerator], samples[denominator])
        return statistics.median(a / b for a, b in pairs)

    def _fraction_of_copy(self, step_ms: float) -> float:
        """Bytes of the minimal fused step over ``step_ms``, against the copy bandwidth."""
        # A copy moves 2 bytes per element and byte of element size.
        assert self.copy_ms is not None  # the callers check it
        return (self.min_traffic / 2) * self.copy_ms / step_ms

    def bandwidth_fraction(self, name: str = "acnorm") -> float:
        """Bytes of the minimal fused step over layer ``name``'s step time, against
        the copy bandwidth."""
        if self.copy_ms is None or name not in self.samples_ms:
            return float("nan")
        return self._fraction_of_copy(self.times_ms[name])

    @property
    def copy_bandwidth_fraction(self) -> float:
        return self.bandwidth_fraction("acnorm")

    def graph_ratio(self, numerator: str, denominator: str) -> float:
        """Ratio of two layers' graph-replayed step times; NaN when either is missing."""
        times = self.graph_step_ms
        if numerator not in times or denominator not in times:
            return float("nan")
        return times[numerator] / times[denominator]

    @property
    def graph_bandwidth_fraction(self) -> float:
        """:meth:`bandwidth_fraction` of the fused step replayed from a CUDA graph."""
        if self.copy_ms is None or "acnorm" not in self.graph_step_ms:
            return float("nan")
        return self._fraction_of_copy(self.graph_step_ms["acnorm"])

    @property
    def other_kernels(self) -> list[str]:
        """Layers of the kernel backends that ``auto`` did not pick, timed beside it."""
        return sorted(name for name in self.samples_ms if name.startswith("acnorm-"))

    @property
    def reference_over_acnorm(self) -> float:
        return self.ratio("reference", "acnorm")

    @property
    def acnorm_over_batchnorm(self) -> float:
        return self.ratio("acnorm", "batchnorm")

    @property
    def memory_acnorm_over_batchnorm(self) -> float:
        return self.peak_bytes["acnorm"] / max(self.peak_bytes["batchnorm"], 1)


def other_kernel_backends(x: torch.Tensor) -> list[str]:
    """The kernel backends that can run ``x`` besides the one ``auto`` picks,
    to be timed beside it."""
    picked = resolve_backend("auto", x, "acnorm bench")
    return [b for b in KERNEL_BACKENDS if b != picked and b in available_backends()]


def fused_passes(layer: nn.Module) -> tuple[str, int]:
    """How a planned fused layer runs its training step: ``"single"`` (the CUDA
    backend's single pass, forward and backward), ``"single fwd"`` or
    ``"single bwd"`` (one of them), or ``"multi"``; and the fewest bytes per
    element and byte of element size that step moves."""
    plans = [plan for key, plan in layer.__dict__.get("_plans", {}).items() if key[-1]]
    fwd, bwd = (r is not None for r in getattr(plans[0].launches, "resident", (None, None))) if plans \
        else (False, False)
    label = {(True, True): "single", (True, False): "single fwd", (False, True): "single bwd"}.get((fwd, bwd), "multi")
    return label, (SINGLE_PASS_TRAFFIC["forward"] if fwd else 3) + (SINGLE_PASS_TRAFFIC["backward"] if bwd else 5)


def make_layers(channels: int, device: torch.device, seed: int = 0,
                other_kernels: Sequence[str] = ()) -> dict[str, nn.Module]:
    """The three layers, with a realistic finetuning state (source != target),
    and an ``acnorm-<backend>`` layer for each of ``other_kernels``."""
    generator = torch.Generator().manual_seed(seed)
    source_w = 0.5 + torch.rand(channels, generator=generator)
    source_b = 0.2 * torch.randn(channels, generator=generator)
    layers: dict[str, ACNorm3d | nn.BatchNorm3d] = {
        "reference": ACNorm3d(channels, backend="reference"),
        "acnorm": ACNorm3d(channels, backend="auto"),
        "batchnorm": nn.BatchNorm3d(channels),
    }
    for backend in other_kernels:
        layers[f"acnorm-{backend}"] = ACNorm3d(channels, backend=backend)
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.copy_(source_w)
            layer.bias.copy_(source_b)
            if isinstance(layer, ACNorm3d):
                layer.weight_target.copy_(source_w * 1.05)
                layer.bias_target.copy_(source_b + 0.02)
    return {name: layer.to(device).train() for name, layer in layers.items()}


def run_case(case: Case, device: torch.device, repeats: int, warmup: int) -> Result:
    """Benchmark the three layers on one case (wall clock, for CPUs)."""
    x, grad = make_input(case, device)
    layers = make_layers(case.shape[1], device)
    steps = {name: (lambda layer=layer: training_step(layer, x, grad)) for name, layer in layers.items()}
    result = Result(case, backend=resolve_backend("auto", x, "acnorm bench"))
    result.samples_ms = time_interleaved(steps, device, repeats, warmup)
    result.peak_bytes = {name: peak_step_memory(step, device) for name, step in steps.items()}
    return result


def run_case_cuda(case: Case, device: torch.device, rounds: int, rep_ms: int, compile_reference: bool) -> Result:
    """Benchmark the layers on one case on a CUDA device, forward and forward+backward.

    Each round times every layer once with ``triton.testing.do_bench`` (the L2
    cache flushed before each run), or, for launch-bound inputs that capture
    cleanly, ``do_bench_cudagraph``.
    """
    import triton.testing

    x, grad = make_input(case, device)
    backend = resolve_backend("auto", x, "acnorm bench")
    layers = make_layers(case.shape[1], device, other_kernels=other_kernel_backends(x))
    if compile_reference:
        # Every case compiles the same forward code again; without a reset the
        # guards of earlier cases pile up until dynamo's recompile limit makes
        # it run later cases eagerly, uncompiled.
        torch._dynamo.reset()
        compiled = copy.deepcopy(layers["reference"])
        # torch.compile of a Module is a Module (an OptimizedModule); its annotations say Callable.
        layers["compiled"] = cast(nn.Module, torch.compile(compiled, dynamic=True))
    steps = {name: (lambda layer=layer: training_step(layer, x, grad)) for name, layer in layers.items()}
    forwards = {name: (lambda layer=layer: layer(x)) for name, layer in layers.items()}
    for fn in (*steps.values(), *forwards.values()):
        fn()  # compile, warm caches
    graph = x.numel() <= GRAPH_MAX_NUMEL and all(captures(fn) for fn in (*steps.values(), *forwards.values()))
    if graph:
        def timer(fn):
            # do_bench_cudagraph replays its graph of ``rep`` ms ten times.
            return triton.testing.do_bench_cudagraph(fn, rep=max(rep_ms // 5, 5), return_mode="median")
    else:
        def timer(fn):
            return triton.testing.do_bench(fn, warmup=max(rep_ms // 4, 1), rep=rep_ms, return_mode="median")

    result = Result(case, backend=backend, timer="do_bench_cudagraph" if graph else "do_bench, L2 flushed")
    result.passes, result.min_traffic = fused_passes(layers["acnorm"])
    result.samples_ms = {name: [] for name in steps}
    result.forward_samples_ms = {name: [] for name in forwards}
    for _ in range(rounds):
        for name in steps:
            result.samples_ms[name].append(timer(steps[name]))
            result.forward_samples_ms[name].append(timer(forwards[name]))
    for name in GRAPH_LAYERS:
        # Rows timed eagerly are large enough that one replay per sample times well.
        replayed = statistics.median(result.samples_ms[name]) if graph else graph_replay_ms(steps[name], 20)
        if replayed is not None:
            result.graph_step_ms[name] = replayed
    target = torch.empty_like(x)
    result.copy_ms = triton.testing.do_bench(lambda: target.copy_(x), warmup=max(rep_ms // 4, 1), rep=rep_ms,
                                             return_mode="median")
    result.peak_bytes = {name: peak_step_memory(steps[name], device) for name in IMPLEMENTATIONS}
    return result


def run(
    cases: Sequence[Case],
    device: torch.device,
    repeats: int = 20,
    warmup: int = 3,
    progress: Callable[[str], None] | None = None,
    compile_reference: bool = True,
    on_result: Callable[[list[Result]], None] | None = None,
) -> list[Result]:
    """Benchmark every case, reporting each finished row through ``progress``.

    On a CPU, ``repeats`` interleaved wall-clock steps after ``warmup`` ones; on
    a CUDA device, ``max(repeats // 5, 1)`` rounds of ``do_bench`` runs of
    ``10 * repeats`` ms each, with ``torch.compile`` of the reference when
    ``compile_reference``. ``on_result`` gets the results so far after each
    case, so that a run cut short still leaves its finished rows.
    """
    results = []
    for index, case in enumerate(cases, 1):
        if device.type == "cuda":
            result = run_case_cuda(case, device, max(repeats // 5, 1), 10 * repeats, compile_reference)
        else:
            result = run_case(case, device, repeats, warmup)
        results.append(result)
        if progress is not None:
            progress(
                f"[{index}/{len(cases)}] {case.label()}: ref/acnorm "
                f"{result.reference_over_acnorm:.2f}, acnorm/bn {result.acnorm_over_batchnorm:.2f}"
            )
        if on_result is not None:
            on_result(results)
    return results


def _cpu_table(results: Sequence[Result]) -> list[str]:
    lines = [
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
    return lines


def _ms(samples: dict[str, list[float]], name: str) -> str:
    return f"{statistics.median(samples[name]):.3f}" if name in samples else "-"


def _graph_ms(result: Result, name: str) -> str:
    return f"{result.graph_step_ms[name]:.3f}" if name in result.graph_step_ms else "-"


def _gpu_table(results: Sequence[Result]) -> list[str]:
    lines = [
        "Forward (fwd) and one training step (step = forward + backward) of: `ref`, the "
        "authors' two-BatchNorm formulation; `compiled`, torch.compile of it; `acnorm`, "
        "acnorm_fused with backend=auto; `acnorm-<backend>`, the other kernel backend, "
        "timed beside it; `bn`, nn.BatchNorm3d. Times are medians in ms "
        "(timer per row: do_bench with the L2 flushed, or do_bench_cudagraph for "
        "launch-bound inputs). `passes`: the fused step's kernels, the CUDA backend's single "
        "pass (`single`: x read once each way) or the multi-pass kernels. `% copy bw`: the "
        f"bytes of a minimal fused step of those passes ({MIN_STEP_TRAFFIC} per element and byte "
        "of element size multi-pass, "
        f"{sum(SINGLE_PASS_TRAFFIC.values())} single) over its time, against "
        "a device-to-device copy of x timed in the same run. `graph`: the step replayed "
        "from a CUDA graph (L2 not flushed), the GPU's time without the host's. Memory: "
        "peak allocated during the step.",
        "",
        "| shape | dtype | layout | backend | passes | timer | fwd ref | fwd compiled | fwd acnorm | fwd bn "
        "| step ref | step compiled | step acnorm | step bn | ref / acnorm | compiled / acnorm "
        "| acnorm / bn | fwd acnorm / bn | % copy bw | peak mem acnorm / bn "
        "| graph acnorm | graph bn | graph acnorm / bn | graph % copy bw ",
        "|---|---|---|---|---|---|" + "---:|" * 19,
    ]
    others = sorted({name for r in results for name in r.other_kernels})
    for name in others:
        lines[2] += f"| step {name} | {name} / bn | compiled / {name} | % copy bw {name} "
        lines[3] += "---:|" * 4
    lines[2] += "|"
    for r in results:
        f, t = r.forward_samples_ms, r.samples_ms
        extra = "".join(
            f"| {_ms(t, name)} | {r.ratio(name, 'batchnorm'):.2f} | {r.ratio('compiled', name):.2f} "
            f"| {100 * r.bandwidth_fraction(name):.0f} " for name in others)
        lines.append(
            f"| {'x'.join(map(str, r.case.shape))} | {r.case.dtype} | {r.case.layout} | {r.backend} "
            f"| {r.passes} | {r.timer} | {_ms(f, 'reference')} | {_ms(f, 'compiled')} | {_ms(f, 'acnorm')} "
            f"| {_ms(f, 'batchnorm')} | {_ms(t, 'reference')} | {_ms(t, 'compiled')} "
            f"| {_ms(t, 'acnorm')} | {_ms(t, 'batchnorm')} | {r.reference_over_acnorm:.2f} "
            f"| {r.ratio('compiled', 'acnorm'):.2f} | {r.acnorm_over_batchnorm:.2f} "
            f"| {r.ratio('acnorm', 'batchnorm', forward=True):.2f} "
            f"| {100 * r.copy_bandwidth_fraction:.0f} | {r.memory_acnorm_over_batchnorm:.3f} "
            f"| {_graph_ms(r, 'acnorm')} | {_graph_ms(r, 'batchnorm')} "
            f"| {r.graph_ratio('acnorm', 'batchnorm'):.2f} | {100 * r.graph_bandwidth_fraction:.0f} {extra}|"
        )
    return lines


def to_markdown(results: Sequence[Result], machine: str) -> str:
    """The results as a Markdown table with the machine named."""
    on_gpu = any(r.forward_samples_ms for r in results)
    table = _gpu_table(results) if on_gpu else _cpu_table(results)
    return "\n".join([f"Machine: {machine}", "", *table]) + "\n"


def write_plot(results: Sequence[Result], path: Path) -> bool:
    """A bar chart of step time per case and layer, as PNG; False when matplotlib
    is not installed."""
    names = [n for n in ("reference", "compiled", "acnorm", "batchnorm") if any(n in r.samples_ms for r in results)]
    series = {name: [statistics.median(r.samples_ms[name]) if name in r.samples_ms else math.nan for r in results]
              for name in names}
    return write_bar_chart(path, [r.case.label() for r in results], series, "forward + backward, ms", log=True)


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
        if r.forward_samples_ms:
            row["ratios"].update(
                compiled_over_acnorm=r.ratio("compiled", "acnorm"),
                forward_acnorm_over_batchnorm=r.ratio("acnorm", "batchnorm", forward=True),
                copy_bandwidth_fraction=r.copy_bandwidth_fraction,
                graph_acnorm_over_batchnorm=r.graph_ratio("acnorm", "batchnorm"),
                graph_copy_bandwidth_fraction=r.graph_bandwidth_fraction,
            )
        rows.append(row)
    return json.dumps({"machine": machine, "python": sys.version.split()[0], "results": rows}, indent=2)
