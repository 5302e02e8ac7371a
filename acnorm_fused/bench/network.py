"""Whole networks: the training step of a BatchNorm network against the same
network converted to AC-Norm, and converted to the authors' formulation.

A layer's speed is the kernels' business; whether a network trains faster is
what a user decides on. For each network this times a full training step
(forward, loss, backward, optimizer step) of three versions built from the
same weights, in turn within each round so that drift hits all three alike:

- ``batchnorm``: the network as built, with its ``nn.BatchNorm*d`` layers;
- ``acnorm``: :func:`acnorm_fused.convert_model` (``backend="auto"``);
- ``reference``: converted with ``backend="reference"`` (the authors' two
  BatchNorms and a sum).

Both converted versions start from target affines moved a little away from
the source ones, as after some finetuning, so that ``S`` is not the identity.
Rows cover float32 and bfloat16 autocast, contiguous and channels-last
memory, and eager or ``torch.compile`` d steps. On a GPU the step time is the
median of CUDA-event timed steps, and the profiler's kernel times give the
share of the step spent in normalisation; on a CPU it is the wall time, and
the share is not measured (the CPU kernels are not told apart by the
profiler). ``--quick`` shrinks every network to CPU sizes: a smoke test of
the whole path, not a claim about speed. This module backs ``acnorm bench
network``.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..convert import convert_model
from ..modules import ACNorm
from .output import write_bar_chart
from .timing import peak_step_memory, quiet_profiler, synchronize

VERSIONS = ("batchnorm", "acnorm", "reference")
MODES = ("eager", "compile", "compile-reduce-overhead")
# Names of the normalisation kernels in the profiler: ATen's and cuDNN's
# BatchNorm, this package's CUDA and Triton kernels.
_NORM_KERNEL_MARKS = ("batch_norm", "bn_fw", "bn_bw", "batchnorm", "acnorm", "reduce_planar", "reduce_interleaved",
                      "elementwise_planar", "elementwise_interleaved", "finalise_", "target_grad")


@dataclass(frozen=True)
class NetworkSpec:
    """A network to time: how to build it at full or quick size, and its input."""

    name: str
    description: str
    spatial_dims: int
    build: Callable[[bool], nn.Module]  # quick -> a fresh network with BatchNorm layers
    input_shape: Callable[[bool], tuple[int, ...]]  # quick -> (N, C, *spatial)
    classes: int


def _dynunet(quick: bool) -> nn.Module:
    from monai.networks.nets import DynUNet

    # nnU-Net's 3d_fullres plan for a 128^3 patch: six stages, filters 32 to 320.
    filters = [8, 16, 16, 32] if quick else [32, 64, 128, 256, 320, 320]
    strides = [1] + [2] * (len(filters) - 1)
    return DynUNet(spatial_dims=3, in_channels=1, out_channels=3, kernel_size=[3] * len(filters),
                   strides=strides, upsample_kernel_size=strides[1:], filters=filters, norm_name="batch")


def _resnet3d(quick: bool) -> nn.Module:
    from monai.networks.nets import resnet18

    return resnet18(spatial_dims=3, n_input_channels=1, num_classes=2, widen_factor=0.125 if quick else 1.0)


def _resnet50_2d(quick: bool) -> nn.Module:
    from monai.networks.nets import resnet50

    return resnet50(spatial_dims=2, n_input_channels=3, num_classes=5, widen_factor=0.0625 if quick else 1.0)


NETWORKS: dict[str, NetworkSpec] = {spec.name: spec for spec in (
    NetworkSpec("dynunet", "MONAI DynUNet, nnU-Net 3d_fullres shape (filters 32-320), batch 2, 128^3",
                3, _dynunet, lambda quick: (2, 1, 16, 16, 16) if quick else (2, 1, 128, 128, 128), 3),
    NetworkSpec("resnet3d", "MONAI ResNet-18, 3D, batch 2, 128^3", 3, _resnet3d,
                lambda quick: (2, 1, 16, 16, 16) if quick else (2, 1, 128, 128, 128), 2),
    NetworkSpec("resnet50-2d", "MONAI ResNet-50, 2D, batch 16, 512^2 (fundus grading)", 2, _resnet50_2d,
                lambda quick: (2, 3, 32, 32) if quick else (16, 3, 512, 512), 5),
)}


@dataclass(frozen=True)
class Row:
    """One configuration: a network in one dtype, layout and mode."""

    network: str
    dtype: str = "float32"
    layout: str = "contiguous"
    mode: str = "eager"

    def label(self) -> str:
        return f"{self.network} {self.dtype} {self.layout} {self.mode}"


@dataclass
class RowResult:
    """Step times (ms, one per round), peak memory and normalisation share of each version."""

    row: Row
    samples_ms: dict[str, list[float]] = field(default_factory=dict)
    peak_bytes: dict[str, int] = field(default_factory=dict)
    norm_share: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def median_ms(self, version: str) -> float:
        return statistics.median(self.samples_ms[version]) if version in self.samples_ms else float("nan")

    def ratio(self, version: str) -> float:
        """Median over rounds of the version's step time over the BatchNorm original's."""
        if version not in self.samples_ms or "batchnorm" not in self.samples_ms:
            return float("nan")
        return statistics.median(a / b for a, b in zip(self.samples_ms[version], self.samples_ms["batchnorm"]))


# The default set on a GPU, sized to about three minutes on an H100/H200: the
# 3D U-Net in both dtypes and layouts and compiled, the other two in bfloat16.
GPU_ROWS = (
    Row("dynunet", "float32"), Row("dynunet", "bfloat16"), Row("dynunet", "bfloat16", "channels_last"),
    Row("dynunet", "bfloat16", mode="compile"), Row("resnet3d", "bfloat16"), Row("resnet50-2d", "bfloat16"),
)


def default_rows(device: torch.device, quick: bool, networks: Sequence[str] | None = None,
                 dtypes: Sequence[str] | None = None, layouts: Sequence[str] | None = None,
                 modes: Sequence[str] | None = None) -> list[Row]:
    """The rows to run: :data:`GPU_ROWS` on a GPU when nothing is chosen; else
    every combination of the choices, whose defaults are all networks, float32
    (and bfloat16 unless ``quick``), both layouts and eager steps. Channels-last
    is for the 3D networks only, CUDA graphs (``compile-reduce-overhead``) for a
    GPU only."""
    if device.type == "cuda" and not quick and networks is dtypes is layouts is modes is None:
        return list(GPU_ROWS)
    networks = networks or tuple(NETWORKS)
    dtypes = dtypes or (("float32",) if quick else ("float32", "bfloat16"))
    layouts = layouts or ("contiguous", "channels_last")
    modes = modes or ("eager",)
    rows = []
    for name in networks:
        spec = NETWORKS[name]
        for dtype in dtypes:
            for layout in layouts:
                if layout == "channels_last" and spec.spatial_dims != 3:
                    continue
                for mode in modes:
                    if mode == "compile-reduce-overhead" and device.type != "cuda":
                        continue
                    rows.append(Row(name, dtype, layout, mode))
    return rows


def _perturb_targets(model: nn.Module, seed: int) -> None:
    """Move every AC-Norm target affine a little away from its source, as finetuning does."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, ACNorm):
                c = layer.num_features
                layer.weight_target.mul_(1 + 0.05 * torch.randn(c, generator=generator).to(layer.weight.device))
                layer.bias_target.add_(0.02 * torch.randn(c, generator=generator).to(layer.weight.device))


def build_versions(spec: NetworkSpec, quick: bool, device: torch.device, layout: str,
                   seed: int = 0) -> dict[str, nn.Module]:
    """The three versions of one network from the same weights, in training mode."""
    torch.manual_seed(seed)
    original = spec.build(quick)
    versions = {"batchnorm": original}
    for name, backend in (("acnorm", "auto"), ("reference", "reference")):
        converted = convert_model(copy.deepcopy(original), backend=backend)
        _perturb_targets(converted, seed + 1)
        versions[name] = converted
    memory_format = _memory_format(spec, layout)
    # Module.to's annotations lack the memory_format keyword that it takes.
    return {name: model.to(device, memory_format=memory_format).train()  # type: ignore[call-overload]
            for name, model in versions.items()}


def _memory_format(spec: NetworkSpec, layout: str) -> torch.memory_format:
    if layout != "channels_last":
        return torch.contiguous_format
    return torch.channels_last_3d if spec.spatial_dims == 3 else torch.channels_last


def make_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, dtype: str,
              mode: str) -> Callable[[], None]:
    """One training step of ``model``: forward (under bfloat16 autocast when asked),
    cross-entropy loss, backward and an SGD step."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    forward: Callable[..., torch.Tensor] = model
    if mode == "compile":
        forward = torch.compile(model)
    elif mode == "compile-reduce-overhead":
        forward = torch.compile(model, mode="reduce-overhead")
    autocast = dtype == "bfloat16"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = forward(x)
        loss = nn.functional.cross_entropy(out.float(), target)
        loss.backward()
        optimizer.step()

    return step


def _inputs(spec: NetworkSpec, quick: bool, device: torch.device, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = spec.input_shape(quick)
    x = torch.randn(shape, generator=generator).to(device).contiguous(memory_format=_memory_format(spec, layout))
    if spec.name == "dynunet":  # segmentation: a label per voxel
        target = torch.randint(0, spec.classes, (shape[0], *shape[2:]), generator=generator)
    else:
        target = torch.randint(0, spec.classes, (shape[0],), generator=generator)
    return x, target.to(device)


def _timed_ms(step: Callable[[], None], device: torch.device, steps: int) -> float:
    """Median time of ``steps`` steps, ms: CUDA events on a GPU, the wall clock on a CPU."""
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def _norm_share(step: Callable[[], None], device: torch.device) -> float | None:
    """The share of one step's GPU kernel time spent in normalisation kernels (None on a CPU)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    try:
        with quiet_profiler(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            synchronize(device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    except RuntimeError:  # a profiler that cannot run here leaves the column empty, not the row
        return None
    total = sum(e.device_time for e in kernels)
    norm = sum(e.device_time for e in kernels if any(mark in e.name.lower() for mark in _NORM_KERNEL_MARKS))
    return norm / total if total else None


def run_row(row: Row, device: torch.device, quick: bool, rounds: int, steps_per_round: int,
            warmup: int) -> RowResult:
    """Time the three versions of one row, in turn within each round."""
    spec = NETWORKS[row.network]
    result = RowResult(row)
    x, target = _inputs(spec, quick, device, row.layout)
    steps = {}
    torch._dynamo.reset()  # each row compiles afresh (recompile limits, cache sizes)
    for name, model in build_versions(spec, quick, device, row.layout).items():
        step = make_step(model, x, target, row.dtype, row.mode)
        try:
            for _ in range(warmup):
                step()
        except Exception as error:  # noqa: BLE001 - a version that cannot run this row is reported
            result.refused[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            continue
        steps[name] = step
    for _ in range(rounds):
        for name, step in steps.items():
            result.samples_ms.setdefault(name, []).append(_timed_ms(step, device, steps_per_round))
    for name, step in steps.items():
        result.peak_bytes[name] = peak_step_memory(step, device)
        share = _norm_share(step, device)
        if share is not None:
            result.norm_share[name] = share
    return result


def run(rows: Sequence[Row], device: torch.device, quick: bool, rounds: int = 5, steps_per_round: int = 3,
        warmup: int = 2, progress: Callable[[str], None] | None = None,
        done: Callable[[list[RowResult]], None] | None = None) -> list[RowResult]:
    """Every row; ``progress`` gets a line per finished row, ``done`` the results so far."""
    results = []
    for index, row in enumerate(rows, 1):
        start = time.perf_counter()
        results.append(run_row(row, device, quick, rounds, steps_per_round, warmup))
        if progress is not None:
            last = results[-1]
            ratio = last.ratio("acnorm")
            progress(f"[{index}/{len(rows)}] {row.label()}: acnorm / batchnorm {ratio:.2f} "
                     f"({time.perf_counter() - start:.1f} s)")
        if done is not None:
            done(results)
    return results


def _cell(value: float, digits: int = 2) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def to_markdown(results: Sequence[RowResult], machine: str, quick: bool) -> str:
    lines = [f"Machine: {machine}" + (" (quick sizes: a smoke test, not a speed claim)" if quick else ""), "",
             "Training step (forward, loss, backward, SGD step) of each network: the BatchNorm original, "
             "converted to AC-Norm (`backend=\"auto\"`) and converted to the authors' formulation "
             "(`backend=\"reference\"`). Median ms; ratios to the BatchNorm original in the same rounds; "
             "peak memory of one step; the share of the step's GPU kernel time in normalisation.", "",
             "| network | dtype | layout | mode | version | step ms | / batchnorm | reference / acnorm "
             "| peak MiB | norm share |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for result in results:
        row = result.row
        for version in VERSIONS:
            if version in result.refused:
                lines.append(f"| {row.network} | {row.dtype} | {row.layout} | {row.mode} | {version} "
                             f"| refused: {result.refused[version]} | | | | |")
                continue
            if version not in result.samples_ms:
                continue
            versus = "-"
            if version == "acnorm" and "reference" in result.samples_ms:
                versus = _cell(statistics.median(
                    r / a for r, a in zip(result.samples_ms["reference"], result.samples_ms["acnorm"])))
            share = result.norm_share.get(version, float("nan"))
            lines.append(
                f"| {row.network} | {row.dtype} | {row.layout} | {row.mode} | {version} "
                f"| {_cell(result.median_ms(version), 3)} | {_cell(result.ratio(version))} | {versus} "
                f"| {result.peak_bytes.get(version, 0) / 2**20:.1f} | {_cell(share)} |")
    lines += ["", "Networks:", *[f"- `{spec.name}`: {spec.description}" for spec in NETWORKS.values()]]
    return "\n".join(lines) + "\n"


def to_json(results: Sequence[RowResult], machine: str, quick: bool) -> str:
    return json.dumps({
        "machine": machine,
        "quick": quick,
        "rows": [{**asdict(r.row), "median_ms": {v: r.median_ms(v) for v in r.samples_ms},
                  "ratio_to_batchnorm": {v: r.ratio(v) for v in r.samples_ms},
                  "samples_ms": r.samples_ms, "peak_bytes": r.peak_bytes, "norm_share": r.norm_share,
                  "refused": r.refused} for r in results],
    }, indent=2)


def write_plot(results: Sequence[RowResult], path: Path) -> bool:
    """Step time of each version per row, as PNG; False when matplotlib is not installed."""
    return write_bar_chart(path, [r.row.label() for r in results],
                           {version: [r.median_ms(version) for r in results] for version in VERSIONS},
                           "training step, ms")
