"""The ``cuda`` backend: the kernels of ``csrc/``, from the compiled module
``acnorm_fused._cuda``.

The steps and buffers are those of :mod:`.multipass`, as in the Triton
backend; :class:`CudaKernels` hands the module raw device pointers, sizes, a
dtype code, the device index and the current CUDA stream. Torch allocates
every buffer, and the module links no torch library, so one build of it
serves every torch release; launches go to the caller's current stream, so
they are ordered with the surrounding torch work and can be captured in a
CUDA graph.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import cuda_extension
from .abi import ACTIVATION_CODES as _ACTIVATION_CODES
from .abi import DTYPE_CODES as _DTYPE_CODES
from .geometry import Geometry, Resident, resident_geometry
from .multipass import MultiPassBackend

# The compiled module's kernel launches (what a stand-in module replaces).
LAUNCHES = ("reduce", "elementwise", "finalise_forward", "finalise_backward", "target_grad",
            "step_forward", "step_backward")


def _pointer(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _f32(t: Tensor) -> Tensor:
    """Per-channel statistics as the kernels read them: contiguous fp32."""
    return t.to(torch.float32).contiguous()


def raw_stream(index: int) -> int:
    """The handle of the current stream of GPU ``index``."""
    # What torch.cuda.current_stream(...).cuda_stream gives, without building
    # a Stream object: that costs more than the launch it serves.
    if _RAW_STREAM is not None:
        return _RAW_STREAM(index)
    return torch.cuda.current_stream(index).cuda_stream


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


@functools.lru_cache(maxsize=256)
def module_geometry(module, geo: Geometry):
    """The compiled module's copy of a launch geometry (built once per input shape)."""
    return module.Geometry(
        planar=geo.planar, n=geo.n, c=geo.c, s=geo.s, split_s=geo.split_s, split_n=geo.split_n,
        s_chunk=geo.s_chunk, n_chunk=geo.n_chunk, splits=geo.row_splits, r_chunk=geo.r_chunk,
        block_c=geo.block_c)


@functools.lru_cache(maxsize=128)
def resident_capacity(module, dtype: torch.dtype, planar: bool, packs: int, vector: bool, backward: bool,
                      index: int) -> int:
    """Blocks of a single-pass kernel variant GPU ``index`` holds at once, as the
    compiled module's occupancy query gives them (asked once per variant)."""
    return module.resident_capacity(_DTYPE_CODES[dtype], planar, packs, vector, backward, index)


def single_pass(module, geo: Geometry, dtype: torch.dtype, index: int) -> tuple[Resident | None, Resident | None]:
    """The single-pass geometry of a step's forward and backward on GPU
    ``index``, each None where the GPU cannot hold the layer: that pass runs
    the multi-pass kernels."""
    def one(backward: bool) -> Resident | None:
        return resident_geometry(geo, dtype.itemsize, module.RESIDENT_PACKS, module.RESIDENT_WARPS,
                                 lambda packs, vector: resident_capacity(module, dtype, geo.planar, packs, vector,
                                                                         backward, index))

    return one(False), one(True)


def capacity_summary(module, index: int) -> str:
    """What GPU ``index`` holds of each single-pass variant of 16-byte packs,
    forward/backward blocks at each compiled packs per lane, e.g.
    ``fp32 planar 396/264 | 264/264, ...`` (what ``acnorm info`` prints)."""
    parts = []
    for dtype in (torch.float32, torch.bfloat16):
        for planar in (True, False):
            held = " | ".join(
                "/".join(str(resident_capacity(module, dtype, planar, packs, True, backward, index))
                         for backward in (False, True)) for packs in module.RESIDENT_PACKS)
            parts.append(f"{str(dtype).removeprefix('torch.')} {'planar' if planar else 'channels-last'} {held}")
    return ", ".join(parts)


def module_resident(module, resident: Resident | None):
    """The compiled module's copy of a single-pass geometry (packs 0 for none)."""
    if resident is None:
        return module.Resident(packs=0, lanes_c=1, tiles=1, blocks=1, vector=False)
    return module.Resident(packs=resident.packs, lanes_c=resident.lanes_c, tiles=resident.tiles,
                           blocks=resident.blocks, vector=resident.vector)


class CudaKernels:
    """Launches of the compiled kernels (see :class:`.multipass.PassKernels`)."""

    @property
    def module(self):
        module = cuda_extension()
        if module is None:
            raise RuntimeError("acnorm_fused._cuda is not built in this installation")
        return module

    @staticmethod
    def _place(t: Tensor) -> tuple[int, int]:
        """``(device index, stream handle)`` of the launches for tensor ``t``
        (no device for the host emulation's CPU tensors)."""
        if not t.is_cuda:
            return -1, 0
        index = t.device.index
        return index, raw_stream(index)

    def _geometry(self, geo: Geometry):
        return module_geometry(self.module, geo)

    def reduce(self, geo: Geometry, x: Tensor, dy: Tensor | None, partials: Tensor,
               aux: Tensor, activation: str, slope: float) -> None:
        self.module.reduce(self._geometry(geo), _DTYPE_CODES[x.dtype], *self._place(x), _pointer(x),
                           _pointer(dy), _pointer(partials), _pointer(aux),
                           _ACTIVATION_CODES[activation], slope)

    def elementwise(self, geo: Geometry, x: Tensor, dy: Tensor | None, out: Tensor,
                    aux: Tensor, coef: Tensor, activation: str, slope: float) -> None:
        self.module.elementwise(self._geometry(geo), _DTYPE_CODES[x.dtype], *self._place(x),
                                _pointer(x), _pointer(dy), _pointer(out), _pointer(aux), _pointer(coef),
                                _ACTIVATION_CODES[activation], slope)

    def finalise_forward(
        self, geo: Geometry, x: Tensor, affines: tuple[Tensor, ...], partials: Tensor | None,
        given: tuple[Tensor, Tensor | None, Tensor] | None, count: float,
        running_mean: Tensor | None, running_var: Tensor | None, outputs: tuple[Tensor, ...],
        momentum: float, eps: float, temperature: float, status: Tensor | None = None,
    ) -> None:
        mean, invstd, new_mean, new_var, aux = outputs
        centre, mean_rel, var = (None, None, None) if given is None else (
            _f32(given[0]), None if given[1] is None else _f32(given[1]), _f32(given[2]))
        update = running_mean is not None
        if running_mean is not None:
            assert running_var is not None  # given together with running_mean (checked)
            running_mean, running_var = _f32(running_mean), _f32(running_var)  # themselves when fp32, contiguous
        else:
            running_var = None
        self.module.finalise_forward(
            _DTYPE_CODES[x.dtype], *self._place(x), _pointer(partials), geo.splits, _pointer(x),
            geo.s if geo.planar else 1, *(_pointer(row) for row in affines), _pointer(centre),
            _pointer(mean_rel), _pointer(var), _pointer(running_mean), _pointer(running_var), _pointer(mean),
            _pointer(invstd), _pointer(new_mean if update else None),
            _pointer(new_var if update else None), _pointer(aux), _pointer(status), geo.c, count, momentum,
            eps, temperature)

    def finalise_backward(self, partials: Tensor, global_sums: Tensor | None, invstd: Tensor,
                          aux: Tensor, grad_affine: Tensor, coef: Tensor, count: float,
                          use_batch_stats: bool) -> None:
        self.module.finalise_backward(
            *self._place(aux), _pointer(partials), partials.shape[2], _pointer(global_sums),
            _pointer(_f32(invstd)), _pointer(aux), _pointer(grad_affine), _pointer(coef),
            partials.shape[1], count, use_batch_stats)

    def target_grad(self, aux: Tensor, grad_affine: Tensor, grad_target: Tensor,
                    temperature: float) -> None:
        self.module.target_grad(*self._place(aux), _pointer(aux), _pointer(grad_affine),
                                _pointer(grad_target), aux.shape[1], temperature)


# aux_like, forward, backward, ...: the contract of backends/pytorch.py.
BACKEND = MultiPassBackend(CudaKernels())
