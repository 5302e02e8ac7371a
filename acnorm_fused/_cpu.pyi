# The compiled module of csrc/cpu/windowed.c (optional; see acnorm_fused.correlation).
# Rows are passed as the address of contiguous rows or as a tuple of one address per row.

WINDOW_ROWS: int
CACHE_DOUBLES: int

def window_state(channels: int, double: bool, signatures: int, state: int, /) -> None: ...
def window_product(channels: int, double: bool, state: int, state_rows: int, temperature: float, rows: int,
                   values: int | tuple[int, ...], out: int | tuple[int, ...], transposed: bool, /) -> None: ...
def window_recalibration(channels: int, double: bool, affines: int | tuple[int, ...], eps: float,
                         temperature: float, out: int, /) -> int: ...
