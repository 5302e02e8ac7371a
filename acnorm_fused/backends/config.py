"""The settings of one AC-Norm call below the op boundary, as one value."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepConfig:
    """What a fused backend needs to know of a call besides its tensors.

    ``momentum`` is the factor of the one running-statistics update (see
    :func:`acnorm_fused.functional.effective_momentum`); ``activation`` is
    ``""``, ``"relu"`` or ``"leaky_relu"``.
    """

    use_batch_stats: bool
    momentum: float
    eps: float
    temperature: float
    activation: str
    negative_slope: float

    def as_args(self) -> tuple[bool, float, float, float, str, float]:
        """The fields in order: how a custom op, whose schema takes no objects, passes them."""
        return (self.use_batch_stats, self.momentum, self.eps, self.temperature, self.activation,
                self.negative_slope)
