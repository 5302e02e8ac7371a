# The compiled module of csrc/cpu/windowed.c (optional; see acnorm_fused.correlation).

WINDOW_ROWS: int

def window_state(channels: int, double: bool, signatures: int, state: int, /) -> None: ...
def window_product(channels: int, double: bool, state: int, temperature: float, rows: int, values: int,
                   out: int, transposed: bool, /) -> None: ...
