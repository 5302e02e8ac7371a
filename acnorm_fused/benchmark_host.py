"""Where an eager training step spends its time on the host.

A small layer on a GPU is done long before Python has finished launching its
next step, so its eager step time is host time. For each case and layer this
measures, side by side in one run:

- ``step``: the step's wall time, synchronised before and after;
- ``host``: the time the host spends issuing the step (no synchronisation at
  its end, so GPU work still running does not count);
- ``graph``: on a GPU, the step replayed from a CUDA graph, i.e. the GPU's
  own time without any host cost (``-`` when the step cannot be captured).

It then lists the Python functions and the torch operators the fused layer's
step spends its host time in (``cProfile`` and ``torch.profiler``), and on a
GPU the operators that wait for the device (``torch.cuda.set_sync_debug_mode``).
This module backs ``acnorm bench --host-profile``.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time
import warnings
from collections.abc import Callable, Sequence

import torch

from .benchmark import (Case, graph_replay_ms, make_input, make_layers, other_kernel_backends, synchronize,
                        training_step)

# Launch-bound cases (most of their eager step is host time) and one large
# case for contrast, on a GPU; the CPU bar's shape on a CPU.
GPU_CASES = (Case((2, 128, 32, 32, 32)), Case((2, 320, 8, 8, 8)), Case((2, 128, 32, 32, 32), "bfloat16"),
             Case((2, 32, 128, 128, 128)))
CPU_CASES = (Case((2, 32, 32, 32, 32)),)


def _medians(step: Callable[[], None], device: torch.device, repeats: int) -> tuple[float, float]:
    """Median wall time and median host-issue time of ``step``, in ms."""
    walls, hosts = [], []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        issued = time.perf_counter()
        synchronize(device)
        done = time.perf_counter()
        hosts.append((issued - start) * 1e3)
        walls.append((done - start) * 1e3)
    return statistics.median(walls), statistics.median(hosts)


def _python_profile(step: Callable[[], None], steps: int, rows: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).strip_dirs().sort_stats("tottime").print_stats(rows)
    return text.getvalue().strip()


def _operator_profile(step: Callable[[], None], device: torch.device, steps: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _synchronising_calls(step: Callable[[], None]) -> list[str]:
    """The warnings torch gives for each operator of ``step`` that waits for the GPU."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return sorted({str(w.message).splitlines()[0] for w in caught})


def profile_case(case: Case, device: torch.device, repeats: int = 50,
                 profile_steps: int = 100) -> list[str]:
    """The Markdown section of one case: the time table, then the fused layer's profiles."""
    x, grad = make_input(case, device)
    other = other_kernel_backends(x) if device.type == "cuda" else []
    layers = make_layers(case.shape[1], device, other_kernels=other)
    steps = {name: (lambda layer=layer: training_step(layer, x, grad)) for name, layer in layers.items()}
    for step in steps.values():
        for _ in range(5):
            step()  # compile, warm caches and the allocator
    lines = [f"### {case.label()}", "",
             "| layer | step ms | host ms | graph ms | host / step |", "|---|---:|---:|---:|---:|"]
    for name, step in steps.items():
        wall, host = _medians(step, device, repeats)
        graph = graph_replay_ms(step, repeats) if device.type == "cuda" else None
        graph_text = "-" if graph is None else f"{graph:.3f}"
        lines.append(f"| {name} | {wall:.3f} | {host:.3f} | {graph_text} | {host / wall:.2f} |")
    fused = steps["acnorm"]
    lines += ["", f"cProfile of {profile_steps} steps of `acnorm`, by own time:", "", "```",
              _python_profile(fused, profile_steps, 30), "```", "",
              f"torch.profiler of {profile_steps // 5} steps of `acnorm`, by self CPU time:", "", "```",
              _operator_profile(fused, device, profile_steps // 5, 25), "```", ""]
    if device.type == "cuda":
        calls = _synchronising_calls(fused)
        lines += ["Operators of one `acnorm` step that wait for the GPU: "
                  + ("none." if not calls else ""), *[f"- {call}" for call in calls], ""]
    return lines


def run(cases: Sequence[Case], device: torch.device, machine: str, repeats: int = 50,
        progress: Callable[[str], None] | None = None) -> str:
    """The whole report, as Markdown."""
    lines = [f"Machine: {machine}", "",
             "Eager training step (forward + backward): wall time (`step`), time the host spends "
             "issuing it (`host`) and, on a GPU, its replay from a CUDA graph (`graph`, GPU time "
             "alone). Medians in ms.", ""]
    for index, case in enumerate(cases, 1):
        lines += profile_case(case, device, repeats)
        if progress is not None:
            progress(f"[{index}/{len(cases)}] {case.label()}: profiled")
    return "\n".join(lines) + "\n"
