"""Tooling around AC-Norm, apart from the operation itself: the benchmarks
behind ``acnorm bench`` (the per-layer table, whole networks, SyncACNorm,
host cost) and the kernel audit behind ``acnorm audit``.

The operation and its modules never import it; only the command line does.
"""
