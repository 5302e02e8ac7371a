"""Merging per-channel moments of disjoint groups of values (splits of one
input, or the batches of several processes).

Each group reports, per channel, its count, a centre ``K`` and the mean and
M2 (sum of squared deviations from the mean) of ``x - K``. Keeping the mean
as ``K + m`` with ``K`` one of the values preserves the small spread of a
channel whose mean is large (CT intensities); merged moments are relative to
the centre of the first group that has values.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MOMENT_ROWS", "merge_moments"]

# Rows of a moments tensor: count, centre, mean relative to the centre, M2.
MOMENT_ROWS = 4


def merge_moments(moments: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Merge ``moments`` of shape ``(groups, 4, C)`` (rows as :data:`MOMENT_ROWS`)
    over the groups: returns ``(count, centre, mean_rel, m2)``, each ``(C,)``.

    ``m2 = sum_g M2_g + n_g (d_g - mean)^2`` with ``d_g`` the group's mean
    relative to the common centre: the parallel-variance formula, exact for a
    large mean, and deterministic (sums in group order). Groups without
    values contribute nothing, whatever their other rows hold.
    """
    counts, centres, means, m2s = moments.unbind(1)
    has_values = counts > 0
    total = counts.sum(0)
    first = has_values.to(torch.int8).argmax(0, keepdim=True)
    centre = centres.gather(0, first).squeeze(0)
    relative = torch.where(has_values, (centres - centre) + means, 0.0)
    mean = (counts * relative).sum(0) / total.clamp_min(1)
    deviations = torch.where(has_values, relative - mean, 0.0)
    m2 = (torch.where(has_values, m2s, 0.0) + counts * deviations.square()).sum(0)
    return total, centre, mean, m2
