"""The shapes every benchmark, the audit and the GPU tests run: one definition.

A :class:`Case` is one input of a normalisation layer (shape, dtype, memory
layout). The sets below are named by what uses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
# Wide layers with few values per channel, where the C x C step is the cost
# (float32, contiguous, on a CPU).
CPU_WIDE_SHAPES: tuple[Shape, ...] = ((2, 1024, 4, 4, 4), (2, 2048, 4, 4, 4), (2, 4096, 4, 4, 4))
TABLE_DTYPES = ("float32", "bfloat16")
LAYOUTS = ("contiguous", "channels_last")


@dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    shape: Shape
    dtype: str = "float32"
    layout: str = "contiguous"  # or "channels_last"

    def label(self) -> str:
        return f"{'x'.join(map(str, self.shape))} {self.dtype} {self.layout}"


def default_cases(device: torch.device) -> list[Case]:
    """The per-layer table's rows: the medical 3D shapes on a GPU, smaller 3D
    shapes on a CPU; fp32 and bf16 each; on a CPU also the wide layers (fp32)."""
    if device.type == "cuda":
        shapes, cl_shapes = GPU_SHAPES, GPU_CHANNELS_LAST_SHAPES
    else:
        shapes, cl_shapes = CPU_SHAPES, CPU_CHANNELS_LAST_SHAPES
    cases = []
    for dtype in TABLE_DTYPES:
        cases += [Case(shape, dtype) for shape in shapes]
        cases += [Case(shape, dtype, "channels_last") for shape in cl_shapes]
    if device.type != "cuda":
        cases += [Case(shape) for shape in CPU_WIDE_SHAPES]
    return cases


# The host profile: launch-bound cases (most of their eager step is host time)
# and one large case for contrast on a GPU; the CPU bar's shape on a CPU.
HOST_GPU_CASES = (Case(GPU_SHAPES[3]), Case(GPU_SHAPES[5]), Case(GPU_SHAPES[3], "bfloat16"), Case(GPU_SHAPES[0]))
HOST_CPU_CASES = (Case(CPU_SHAPES[0]),)
# The step whose host cost is counted on a CPU: small enough that the kernels'
# work is negligible next to the path to them.
COST_CASE = Case((2, 64, 4, 4, 4))

# The audit's quick set: one launch set per layout, dtype and kernel family,
# (shape, dtype, layout, activation).
AUDIT_QUICK_CASES = (
    (GPU_SHAPES[0], "bfloat16", "contiguous", "relu"),
    (GPU_CHANNELS_LAST_SHAPES[1], "float32", "channels_last", "leaky_relu"),
    (GPU_SHAPES[5], "float16", "contiguous", ""),
)
# The audit's byte counts under the interpreter: small inputs that take the
# same code paths as the large ones (planar with several splits per channel,
# interleaved, every dtype); the launch heuristics see two multiprocessors.
AUDIT_TRAFFIC_CASES = (
    ((2, 4, 8, 8, 16), "float32", "contiguous"),
    ((2, 4, 8, 8, 16), "bfloat16", "contiguous"),
    ((2, 16, 4, 4, 8), "float32", "channels_last"),
    ((2, 16, 4, 4, 8), "float16", "channels_last"),
    ((3, 5, 7, 6, 5), "float32", "contiguous"),
)


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
