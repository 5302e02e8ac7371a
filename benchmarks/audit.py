"""The kernel audit, as a script: ``python benchmarks/audit.py [--quick]
[--archs 80,90,100] [--out DIR]``, the same as ``acnorm audit``.

Compiles the Triton kernels for GPU targets with the specialisation a real
launch gets and reports registers, shared memory, spills and the width of
every global access; counts the bytes each fused op moves under the
interpreter; and lists registers, spills and load widths of the compiled CUDA
module when it is installed. No GPU is needed. Exits 1 on a regression (see
:mod:`acnorm_fused.bench.audit`).
"""

import sys

from acnorm_fused.cli import main

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))
