"""How an input is laid out for the kernels, and the launch heuristics.

Every supported input is one of two dense layouts of ``(N, C, *spatial)``
with ``S`` spatial positions per sample:

- *planar*: contiguous NC(D)HW, a channel's values are ``N`` runs of ``S``
  consecutive elements;
- *interleaved*: channels_last / channels_last_3d, or any input with ``S == 1``
  (``(N, C)``), a ``(N * S, C)`` row-major matrix whose rows hold one value of
  every channel.

Each kernel family has one variant per layout, so that the innermost index
always walks consecutive addresses and the loads vectorise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# A streaming tile: enough elements per program and loop step to keep 16-byte
# loads in flight on every lane of 8 warps, few enough to stay in registers.
_TILE = 4096
# Programs per streaming multiprocessor that a statistics pass aims for.
_WAVES = 4
# The finalise step holds one tile of partials per block of channels.
_FINALISE_TILE = 2048
# Column block of the C x C correlation tiles.
CORRELATION_BLOCK = 64


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _worker_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in for the interpreter."""
    if device.type == "cuda":
        return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return 2


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_warps(tile: int) -> int:
    """Warps for a tile: at most 8, and at least 8 elements per thread, so that
    16-bit inputs still load 16 bytes at a time."""
    return max(1, min(8, tile // (32 * 8)))


@dataclass(frozen=True, kw_only=True)
class Geometry:
    """Sizes of the input and the launch configuration of every pass over it."""

    planar: bool
    n: int  # samples
    c: int  # channels
    s: int  # spatial positions per sample
    # Reduction passes: (C, split_s, split_n) programs for planar inputs, each
    # covering n_chunk samples and s_chunk positions; (c_blocks, row_splits)
    # programs for interleaved inputs, each covering r_chunk rows.
    block: int  # planar: elements per step
    block_r: int  # interleaved: rows per step
    block_c: int  # interleaved: channels per step
    split_s: int  # planar (1 when interleaved)
    split_n: int  # planar (1 when interleaved)
    s_chunk: int  # planar (0 when interleaved)
    n_chunk: int  # planar (0 when interleaved)
    row_splits: int  # interleaved (1 when planar)
    r_chunk: int  # interleaved (0 when planar)
    num_warps: int  # of the elementwise passes

    # The reduction passes keep three fp32 accumulators per element of their
    # tile (Welford's count, mean, M2): half the streaming tile keeps them in
    # about 64 registers per thread (124 with the full tile on sm_90), so more
    # programs fit on a multiprocessor. Chunks stay whole multiples of it.
    @property
    def reduce_block(self) -> int:
        return max(16, self.block // 2)

    @property
    def reduce_block_r(self) -> int:
        return max(1, self.block_r // 2)

    @property
    def reduce_num_warps(self) -> int:
        """Warps of the reduction passes, for their (halved) tile."""
        return _num_warps(self.reduce_block if self.planar else self.reduce_block_r * self.block_c)

    @property
    def rows(self) -> int:
        """Rows of the interleaved view, ``N * S``."""
        return self.n * self.s

    @property
    def count(self) -> int:
        """Values per channel (as many as rows)."""
        return self.rows

    @property
    def splits(self) -> int:
        """Partial results per channel of a reduction pass."""
        return self.split_s * self.split_n if self.planar else self.row_splits

    @property
    def c_blocks(self) -> int:
        return _cdiv(self.c, self.block_c)

    def reduce_grid(self) -> tuple[int, ...]:
        if self.planar:
            return (self.c, self.split_s, self.split_n)
        return (self.c_blocks, self.row_splits)

    def elementwise_grid(self) -> tuple[int]:
        if self.planar:
            return (self.n * self.c * _cdiv(self.s, self.block),)
        return (_cdiv(self.rows, self.block_r) * self.c_blocks,)


# Lanes of a warp: a single-pass tile is held by one warp.
_WARP = 32


@dataclass(frozen=True)
class Resident:
    """The single-pass geometry of one pass of the CUDA kernels
    (``csrc/acnorm/resident.cu``): warps that each hold one tile of x,
    ``packs`` packs per lane, across the launch's grid barriers."""

    packs: int  # per lane
    lanes_c: int  # lanes across channels: 1 when planar
    tiles: int  # per channel group (a channel when planar): partial results per channel
    blocks: int  # the grid
    vector: bool  # 16-byte packs; else one element per pack


def resident_geometry(geo: Geometry, element_size: int, packs_options: Sequence[int], warps_per_block: int,
                      capacity: Callable[[int, bool], int]) -> Resident | None:
    """The single pass for ``geo``: the fewest packs per lane (so the most warps
    load at once) whose grid the GPU holds, ``capacity(packs, vector)``
    blocks; None when no variant fits (then the multi-pass kernels run it).
    Packs are 16 bytes (``vector``) when the input is in whole 16-byte packs,
    else one element each.

    A planar tile is a run of one channel's packs (``_WARP * packs`` of them);
    an interleaved one is ``_WARP // lanes_c * packs`` rows of ``lanes_c`` packs
    of channels. The grid also gives every channel a warp for its row of S,
    while the GPU holds the blocks."""
    width = 16 // element_size
    vector = (geo.s if geo.planar else geo.c) % width == 0
    if not vector:
        width = 1
    if geo.planar:
        lanes_c, items, groups = 1, geo.n * (geo.s // width), geo.c
    else:
        lanes_c = min(_WARP, _next_pow2(geo.c // width))
        items, groups = geo.rows * lanes_c, _cdiv(geo.c, lanes_c * width)
    for packs in sorted(packs_options):
        tiles = _cdiv(items, _WARP * packs)
        needed = _cdiv(groups * tiles, warps_per_block)
        held = capacity(packs, vector)
        if needed <= held:
            blocks = max(needed, min(_cdiv(geo.c, warps_per_block), held))
            return Resident(packs=packs, lanes_c=lanes_c, tiles=tiles, blocks=blocks, vector=vector)
    return None


def finalise_blocks(channels: int, num_splits: int) -> tuple[int, int]:
    """``(channels per program, padded splits)`` of a Triton finalise step over
    ``num_splits`` partial results per channel."""
    split_block = _next_pow2(num_splits)
    return max(1, min(_next_pow2(channels), _FINALISE_TILE // split_block, 32)), split_block


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def is_dense(x: Tensor) -> bool:
    """Contiguous, or channels-last of its rank: the layouts the kernels walk as
    they are (any other is copied to contiguous first)."""
    if x.is_contiguous():
        return True
    memory_format = _CHANNELS_LAST.get(x.dim())
    return memory_format is not None and x.is_contiguous(memory_format=memory_format)


def is_planar(x: Tensor) -> bool:
    """Whether ``x`` takes the planar kernels (else the interleaved ones)."""
    spatial = x.numel() // max(x.shape[0] * x.shape[1], 1)
    return x.is_contiguous() and spatial > 1


def geometry(x: Tensor) -> Geometry:
    """The layout of ``x`` (contiguous or channels-last, as :func:`is_planar`
    decides) and the launch configuration for it."""
    n, c = x.shape[0], x.shape[1]
    return _geometry(n, c, x.numel() // max(n * c, 1), is_planar(x), _worker_count(x.device))


# A network calls this for a few shapes, every step: the answer is kept.
@functools.lru_cache(maxsize=1024)
def _geometry(n: int, c: int, s: int, planar: bool, workers: int) -> Geometry:
    target = _WAVES * workers
    per_channel = max(1, _cdiv(target, c))
    if planar:
        block = min(_TILE, max(16, _next_pow2(s)))
        s_blocks = max(1, _cdiv(s, block))
        split_s = min(per_channel, s_blocks)
        s_chunk = _cdiv(s_blocks, split_s) * block
        split_s = max(1, _cdiv(s, s_chunk))
        split_n = min(n, _cdiv(per_channel, split_s))
        n_chunk = _cdiv(n, split_n)
        split_n = _cdiv(n, n_chunk)
        return Geometry(planar=True, n=n, c=c, s=s, block=block, block_r=1, block_c=1, split_s=split_s,
                        split_n=split_n, s_chunk=s_chunk, n_chunk=n_chunk, row_splits=1, r_chunk=0,
                        num_warps=_num_warps(block))
    rows = n * s
    block_c = min(_next_pow2(c), 64)
    block_r = max(1, min(_TILE // block_c, _next_pow2(rows)))
    per_block = max(1, _cdiv(target, _cdiv(c, block_c)))
    r_blocks = max(1, _cdiv(rows, block_r))
    splits = min(per_block, r_blocks)
    r_chunk = _cdiv(r_blocks, splits) * block_r
    splits = max(1, _cdiv(rows, r_chunk))
    return Geometry(planar=False, n=n, c=c, s=s, block=1, block_r=block_r, block_c=block_c, split_s=1,
                    split_n=1, s_chunk=0, n_chunk=0, row_splits=splits, r_chunk=r_chunk,
                    num_warps=_num_warps(block_r * block_c))
